//! The crate's one deterministic generator: splitmix64.
//!
//! LSH hash seeds, generated traces and benchmark inputs all need numbers
//! that are the same on every machine for a given seed, not randomness of
//! good quality; splitmix64 is the smallest generator that passes the usual
//! statistical tests, and its finaliser doubles as a 64-bit mixer.

/// The splitmix64 finaliser: a bijective 64-bit mixer.
pub fn mix64(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The splitmix64 generator: advances `state`, returns the next value.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    mix64(*state)
}
