//! Request traces: the Mooncake format and the planner's own window format.
//!
//! A Mooncake trace (`conversation_trace.jsonl` and its siblings) has one
//! JSON object per line: `timestamp` (ms since start), `input_length` and
//! `output_length` (tokens), and `hash_ids`, the ids of the request's
//! 512-token prefix blocks. Equal ids are the same KV block, and ids are
//! chained: two requests that share block `k` share blocks `0..k` too.
//!
//! The planner's format is one [`WindowInput`](crate::model::WindowInput)
//! per line; each of its requests becomes a trace request arriving at the
//! window's `now_ns`, needing its `pages` as blocks.
//!
//! Bad lines are errors with the line number, or, with `skip_bad`, are
//! counted and left out.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::model::WindowInput;

/// One request of a trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceRequest {
    /// Arrival, ns from the start of the trace.
    pub arrival_ns: u64,
    /// Prompt tokens; 0 means whole blocks (the planner format).
    pub input_tokens: u64,
    /// Generated tokens.
    pub output_tokens: u64,
    /// KV block ids of the prompt, in order.
    pub blocks: Vec<u64>,
}

/// A whole trace, sorted by arrival.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trace {
    /// Requests, by arrival (stable for equal times).
    pub requests: Vec<TraceRequest>,
    /// Lines left out with `skip_bad`.
    pub skipped: usize,
}

#[derive(Deserialize)]
struct MooncakeLine {
    timestamp: f64,
    input_length: u64,
    #[serde(default)]
    output_length: u64,
    hash_ids: Vec<u64>,
}

impl Trace {
    /// Reads a trace file; the format is recognised from its first line.
    pub fn read(path: &Path, skip_bad: bool) -> Result<Trace> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Trace::parse(&text, &path.display().to_string(), skip_bad)
    }

    /// Parses trace text; `origin` names the source in errors.
    pub fn parse(text: &str, origin: &str, skip_bad: bool) -> Result<Trace> {
        let windows = text
            .lines()
            .find(|l| !l.trim().is_empty())
            .is_some_and(|l| l.contains("\"requests\""));
        let mut trace = Trace::default();
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let parsed = if windows {
                window_line(line, origin, n + 1)
            } else {
                mooncake_line(line).map(|r| vec![r])
            };
            match parsed {
                Ok(requests) => trace.requests.extend(requests),
                Err(_) if skip_bad => trace.skipped += 1,
                Err(message) => {
                    return Err(Error::Trace {
                        origin: origin.to_owned(),
                        line: n + 1,
                        message: format!("{message} (use --skip-bad to leave bad lines out)"),
                    });
                }
            }
        }
        trace.requests.sort_by_key(|r| r.arrival_ns);
        Ok(trace)
    }

    /// Only the requests arriving before `seconds` (all when 0).
    pub fn truncate_to(&mut self, seconds: f64) {
        if seconds > 0.0 {
            let limit = (seconds * 1e9) as u64;
            self.requests.retain(|r| r.arrival_ns < limit);
        }
    }

    /// A generated trace with the shape of a conversation workload, for
    /// when no real trace is at hand: `sessions` conversations, each a
    /// shared system prompt (one of 8) followed by turns that extend the
    /// conversation's own prefix; about 3 requests per second; deterministic
    /// for a given seed.
    pub fn synthetic(requests: usize, sessions: usize, seed: u64) -> Trace {
        let mut state = seed;
        let mut next = move || crate::rng::splitmix64(&mut state);
        let sessions = sessions.max(1);
        let mut next_block = 8u64;
        let mut history: Vec<Vec<u64>> = (0..sessions).map(|s| vec![(s % 8) as u64]).collect();
        let mut t = 0u64;
        let mut out = Vec::with_capacity(requests);
        for _ in 0..requests {
            t += 1 + next() % 600_000_000;
            let s = (next() % sessions as u64) as usize;
            let turn = 1 + next() % 6;
            for _ in 0..turn {
                history[s].push(next_block);
                next_block += 1;
            }
            let blocks = history[s].clone();
            out.push(TraceRequest {
                arrival_ns: t,
                input_tokens: blocks.len() as u64 * 512 - next() % 256,
                output_tokens: 1 + next() % 500,
                blocks,
            });
            // Conversations end, and their prefix is not reused.
            if history[s].len() > 40 {
                history[s].truncate(1);
            }
        }
        Trace {
            requests: out,
            skipped: 0,
        }
    }

    /// Distinct blocks and block references, for reports.
    pub fn block_stats(&self) -> (usize, usize) {
        let mut seen = std::collections::HashSet::new();
        let mut refs = 0;
        for r in &self.requests {
            refs += r.blocks.len();
            seen.extend(r.blocks.iter().copied());
        }
        (seen.len(), refs)
    }
}

fn mooncake_line(line: &str) -> std::result::Result<TraceRequest, String> {
    let l: MooncakeLine = serde_json::from_str(line).map_err(|e| e.to_string())?;
    if !(l.timestamp.is_finite() && l.timestamp >= 0.0) {
        return Err(format!("timestamp {} must be a number >= 0", l.timestamp));
    }
    if l.input_length == 0 {
        return Err("input_length must be > 0".into());
    }
    if l.hash_ids.is_empty() {
        return Err("hash_ids must list at least one block".into());
    }
    Ok(TraceRequest {
        arrival_ns: (l.timestamp * 1e6).round() as u64,
        input_tokens: l.input_length,
        output_tokens: l.output_length,
        blocks: l.hash_ids,
    })
}

fn window_line(
    line: &str,
    origin: &str,
    n: usize,
) -> std::result::Result<Vec<TraceRequest>, String> {
    let input =
        WindowInput::from_json(line, &format!("{origin}:{n}")).map_err(|e| e.to_string())?;
    Ok(input
        .requests
        .iter()
        .map(|r| TraceRequest {
            arrival_ns: input.now_ns,
            input_tokens: 0,
            output_tokens: 0,
            blocks: r.pages.clone(),
        })
        .collect())
}
