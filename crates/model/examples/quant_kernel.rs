//! Throughput of the quantised kernels on synthetic Q4_1 weights:
//! `cargo run --release -p tabletrace-model --example quant_kernel -- N K M REPS`.
use std::time::Instant;
use tabletrace_model::kernels::{BlockFormat, QuantWeight};

fn main() {
    let a: Vec<usize> = std::env::args().skip(1).map(|s| s.parse().unwrap()).collect();
    let (n, k, m, reps) = (a[0], a[1], a[2], a[3]);
    let mut seed = 7u32;
    let mut next = || {
        seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
        (seed >> 8) as u8
    };
    let data: Vec<u8> =
        (0..n * k / 32 * 20).map(|i| if i % 20 < 4 { [0x00, 0x20, 0x00, 0xa0][i % 20] } else { next() }).collect();
    let w = QuantWeight::new(BlockFormat::Q4_1, data, n, k).unwrap();
    let x: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
    let mut sink = 0f32;
    for _ in 0..3 {
        sink += w.matmul(&x, m)[0];
    }
    let t = Instant::now();
    for _ in 0..reps {
        sink += w.matmul(&x, m)[0];
    }
    let s = t.elapsed().as_secs_f64() / reps as f64;
    let dp = (n * k * m) as f64 / 64.0;
    println!(
        "n={n} k={k} m={m}: {:.1} us/call, {:.2} G vpdpbusd-equivalents/s, {:.1} GB/s of weights ({sink})",
        s * 1e6,
        dp / s / 1e9,
        (n * k / 32 * 20) as f64 / s / 1e9
    );
}
