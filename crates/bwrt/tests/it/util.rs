//! Helpers shared by the tests.

use bwrt::{DType, Runtime, RuntimeConfig, WaveSpec};

/// A small deterministic generator (xorshift64*), so failures reproduce.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in [-1, 1), rounded to `dtype` so the reference sees the
    /// same inputs as the runtime.
    pub fn values(&mut self, len: usize, dtype: DType) -> Vec<f32> {
        (0..len)
            .map(|_| {
                let v = (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
                round(v, dtype)
            })
            .collect()
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

pub fn round(v: f32, dtype: DType) -> f32 {
    match dtype {
        DType::F32 => v,
        DType::F16 => half::f16::from_f32(v).to_f32(),
        DType::BF16 => half::bf16::from_f32(v).to_f32(),
    }
}

/// `a [m x k] · b [k x n]`, row-major, by the textbook triple loop (f64).
pub fn naive(a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    let mut c = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = 0f64;
            for p in 0..k {
                s += f64::from(a[i * k + p]) * f64::from(b[p * n + j]);
            }
            c[i * n + j] = s as f32;
        }
    }
    c
}

/// A wave spec with the given tile and swap window.
pub fn spec(tile: (u32, u32, u32), window: (u64, u64)) -> WaveSpec {
    WaveSpec {
        bm: tile.0,
        bn: tile.1,
        bk: tile.2,
        swap_begin: window.0,
        swap_end: window.1,
        ..bwrt::default_wave_spec()
    }
}

pub fn runtime(workers: usize, ring_depth: usize, spec: WaveSpec) -> Runtime {
    match runtime_on(bwrt::Backend::Cpu, workers, ring_depth, spec) {
        Ok(rt) => rt,
        Err(e) => panic!("runtime: {e}"),
    }
}

/// A runtime on `backend`, or the error that refused it.
pub fn runtime_on(
    backend: bwrt::Backend,
    workers: usize,
    ring_depth: usize,
    spec: WaveSpec,
) -> bwrt::Result<Runtime> {
    Runtime::new(RuntimeConfig {
        workers,
        ring_depth,
        wave_spec: spec,
        backend,
    })
}
