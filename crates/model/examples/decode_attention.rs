//! Decoding attention (`ops::attention`, one new token per row) over the
//! key/value cache of 30 layers at SmolLM2-135M's shapes (batch 8, 3
//! key/value heads of 64, 3 query heads each), f32 and f16 caches. Between
//! two layers a layer's worth of weights (3.3 MB) is read, as decoding
//! does, so that the cache comes from memory and not from L3 (`EVICT=0`:
//! not).
//!
//! `RAYON_NUM_THREADS=1 cargo run --release -p tabletrace-model --example decode_attention`
use candle_core::{DType, Device, Tensor};
use std::time::{Duration, Instant};

fn main() -> candle_core::Result<()> {
    // On a worker of the pool, as generation runs (from outside, each call
    // would wait for a sleeping worker to wake).
    rayon::scope(|_| run())
}

fn run() -> candle_core::Result<()> {
    const LAYERS: usize = 30;
    let (b, kv, g, d) = (8, 3, 3, 64);
    let weights: Vec<u8> =
        (0..std::env::var("EVICT").map_or(3_300_000, |v| v.parse().unwrap())).map(|i| i as u8).collect();
    println!("threads: {}", rayon::current_num_threads());
    for s in [48, 270] {
        for dtype in [DType::F32, DType::F16] {
            let dev = Device::Cpu;
            let q = Tensor::randn(0f32, 1.0, (b, kv, g, d), &dev)?;
            // Views of a preallocated cache, as the model's cache hands out.
            let caches: Vec<(Tensor, Tensor)> = (0..LAYERS)
                .map(|_| -> candle_core::Result<_> {
                    let k = Tensor::randn(0f32, 1.0, (b, kv, s + 32, d), &dev)?.to_dtype(dtype)?;
                    let v = Tensor::randn(0f32, 1.0, (b, kv, s + 32, d), &dev)?.to_dtype(dtype)?;
                    Ok((k.narrow(2, 0, s)?, v.narrow(2, 0, s)?))
                })
                .collect::<candle_core::Result<_>>()?;
            let mut best = Duration::MAX;
            for _ in 0..20 {
                let mut spent = Duration::ZERO;
                for (k, v) in &caches {
                    std::hint::black_box(weights.iter().step_by(64).fold(0u8, |a, &w| a ^ w));
                    let t = Instant::now();
                    std::hint::black_box(tabletrace_model::ops::attention(&q, k, v, None, 0.125)?);
                    spent += t.elapsed();
                }
                best = best.min(spent);
            }
            let bytes = (2 * b * kv * s * d * dtype.size_in_bytes() * LAYERS) as f64;
            println!(
                "context {s:>3}, {:?} cache: {:7.1} us per step (30 layers), {:5.1} GB/s of cache",
                dtype,
                best.as_secs_f64() * 1e6,
                bytes / best.as_secs_f64() / 1e9
            );
        }
    }
    Ok(())
}
