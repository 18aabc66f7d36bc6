//! GFLOP/s of the f32 decoding kernel (`kernels::f32_rows`) for the batch
//! sizes and weight shapes of SmolLM2-135M and Qwen2.5-0.5B, with the
//! weights of 30 layers so that they stream from memory as in decoding.
//!
//! `RAYON_NUM_THREADS=1 cargo run --release -p tabletrace-model --example decode_kernels`
use std::time::Instant;

fn main() {
    const LAYERS: usize = 30;
    println!("threads: {}", rayon::current_num_threads());
    for m in [1, 4, 8] {
        for (n, k) in [(576, 576), (1536, 576), (576, 1536), (896, 4864)] {
            let x: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
            let ws: Vec<Vec<f32>> =
                (0..LAYERS).map(|l| (0..n * k).map(|i| ((i + l) % 5) as f32 * 0.1).collect()).collect();
            let best = (0..5)
                .map(|_| {
                    let t = Instant::now();
                    for w in &ws {
                        std::hint::black_box(tabletrace_model::kernels::f32_rows(&x, m, w, n, k));
                    }
                    t.elapsed().as_secs_f64()
                })
                .fold(f64::MAX, f64::min);
            let flops = 2.0 * (m * n * k * LAYERS) as f64;
            let bytes = (n * k * 4 * LAYERS) as f64;
            println!(
                "m={m} n={n:>4} k={k:>4}: {:6.1} GFLOP/s, {:5.1} GB/s of weights",
                flops / best / 1e9,
                bytes / best / 1e9
            );
        }
    }
}
