//! Stage 2: tenant credits, as real token buckets.
//!
//! Each tenant's bucket refills at `rate_bytes_per_s` up to `burst_bytes`,
//! and what is left carries over to the next window. Requests are charged in
//! the planning order (least slack first); a request is admitted when its
//! bytes fit the tokens left, or when the bucket is full. The second rule
//! keeps a request larger than the burst from starving forever: it is let
//! through and the bucket goes into debt, repaid by later refills. A tenant
//! is charged for the bytes its requests need, even where another request
//! shares the fetch, so one tenant's budget never depends on another's
//! traffic.

use std::collections::HashMap;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::order::Derived;
use super::{Context, Report, TenantUse};

/// A token bucket of bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenBucket {
    /// Refill rate, bytes per second.
    pub rate_bytes_per_s: f64,
    /// Capacity, bytes.
    pub burst_bytes: f64,
    /// Bytes available now; negative when in debt.
    pub tokens: f64,
    /// Time of the last refill, ns.
    pub last_ns: u64,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate_bytes_per_s: f64, burst_bytes: f64, now_ns: u64) -> TokenBucket {
        TokenBucket {
            rate_bytes_per_s,
            burst_bytes,
            tokens: burst_bytes,
            last_ns: now_ns,
        }
    }

    /// Adds the tokens earned since the last refill, up to the burst. Time
    /// going backwards earns nothing.
    pub fn refill(&mut self, now_ns: u64) {
        let elapsed = now_ns.saturating_sub(self.last_ns) as f64 / 1e9;
        self.tokens = (self.tokens + elapsed * self.rate_bytes_per_s).min(self.burst_bytes);
        self.last_ns = self.last_ns.max(now_ns);
    }

    /// Whether the bucket is full.
    pub fn is_full(&self) -> bool {
        self.tokens >= self.burst_bytes
    }

    /// Takes `bytes` when they fit or the bucket is full; says whether it did.
    pub fn try_take(&mut self, bytes: u64) -> bool {
        let bytes = bytes as f64;
        if bytes <= self.tokens || self.is_full() {
            self.tokens -= bytes;
            true
        } else {
            false
        }
    }
}

/// Charges the requests to their tenants' buckets; returns which requests
/// are deferred, by position (empty when none is).
///
/// A tenant whose bucket holds its whole demand has every request admitted
/// whatever the order, so only the requests of tenants that fall short are
/// ordered and charged one by one: the common window sorts nothing.
pub(crate) fn charge(
    cx: &Context<'_>,
    reqs: &[Derived],
    buckets: &mut HashMap<String, TokenBucket>,
    report: &mut Report,
) -> Vec<bool> {
    let tenants = &cx.input.tenants;
    let mut live: Vec<TokenBucket> = tenants
        .iter()
        .map(|t| {
            let mut b = buckets
                .remove(&t.name)
                .unwrap_or_else(|| TokenBucket::new(0.0, t.burst_bytes as f64, cx.now));
            // The input's numbers are the current contract; tokens carry over.
            b.rate_bytes_per_s = t.rate_bytes_per_s as f64;
            b.burst_bytes = t.burst_bytes as f64;
            b.refill(cx.now);
            b
        })
        .collect();
    let demand = demand_per_tenant(reqs, tenants.len());
    let short: Vec<bool> = live
        .iter()
        .zip(&demand)
        .map(|(b, &d)| cx.config.credits && d as f64 > b.tokens)
        .collect();
    let mut uses: Vec<TenantUse> = tenants
        .iter()
        .zip(&demand)
        .map(|(t, &d)| TenantUse {
            tenant: t.name.clone(),
            demand_bytes: d,
            admitted_bytes: 0,
            deferred_bytes: 0,
            tokens_left: 0.0,
        })
        .collect();
    let mut deferred: Vec<bool> = Vec::new();
    if short.iter().any(|&s| s) {
        deferred = vec![false; reqs.len()];
        for o in super::order::order(cx, reqs, |t| short[t]) {
            let t = o.tenant as usize;
            if live[t].try_take(o.bytes) {
                uses[t].admitted_bytes += o.bytes;
            } else {
                uses[t].deferred_bytes += o.bytes;
                report.deferred_bytes += o.bytes;
                report.credit_deferred.push(o.index);
                deferred[o.index as usize] = true;
            }
        }
    }
    for (t, mut bucket) in live.into_iter().enumerate() {
        if !short[t] {
            uses[t].admitted_bytes = demand[t];
            if cx.config.credits {
                bucket.tokens -= demand[t] as f64;
            }
        }
        uses[t].tokens_left = bucket.tokens;
        buckets.insert(tenants[t].name.clone(), bucket);
    }
    report.tenants = uses;
    deferred
}

/// Bytes demanded per tenant.
fn demand_per_tenant(reqs: &[Derived], tenants: usize) -> Vec<u64> {
    let add = |mut acc: Vec<u64>, r: &Derived| {
        if let Some(t) = r.tenant {
            acc[t] += r.bytes;
        }
        acc
    };
    if reqs.len() < super::order::PARALLEL_FROM {
        return reqs.iter().fold(vec![0; tenants], add);
    }
    reqs.par_iter()
        .with_min_len(8192)
        .fold(|| vec![0; tenants], add)
        .reduce(
            || vec![0; tenants],
            |mut a, b| {
                for (x, y) in a.iter_mut().zip(b) {
                    *x += y;
                }
                a
            },
        )
}
