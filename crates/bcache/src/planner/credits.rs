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

/// Charges requests in `order`; returns the admitted ones in input order.
pub(crate) fn charge(
    cx: &Context<'_>,
    reqs: &[Derived],
    order: &[u32],
    buckets: &mut HashMap<String, TokenBucket>,
    report: &mut Report,
) -> Vec<u32> {
    let tenants = &cx.input.tenants;
    let mut uses: Vec<TenantUse> = tenants
        .iter()
        .map(|t| TenantUse {
            tenant: t.name.clone(),
            demand_bytes: 0,
            admitted_bytes: 0,
            deferred_bytes: 0,
            tokens_left: 0.0,
        })
        .collect();
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
    let mut admitted = Vec::with_capacity(order.len());
    for &i in order {
        let r = &reqs[i as usize];
        let Some(t) = r.tenant else {
            admitted.push(i);
            continue;
        };
        uses[t].demand_bytes += r.bytes;
        if !cx.config.credits || live[t].try_take(r.bytes) {
            uses[t].admitted_bytes += r.bytes;
            admitted.push(i);
        } else {
            uses[t].deferred_bytes += r.bytes;
            report.deferred_bytes += r.bytes;
            report.credit_deferred.push(r.index as u32);
        }
    }
    // Later stages read the requests in input order: sequential memory.
    admitted.sort_unstable();
    for (t, bucket) in live.into_iter().enumerate() {
        uses[t].tokens_left = bucket.tokens;
        buckets.insert(tenants[t].name.clone(), bucket);
    }
    report.tenants = uses;
    admitted
}
