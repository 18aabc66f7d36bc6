use candle_core::{Device, Tensor};
use std::time::Instant;
fn main() {
    let d = Device::Cpu;
    for &(m, k, n) in &[(1usize, 576usize, 1536usize), (8, 576, 1536), (8, 1536, 576), (64, 576, 1536), (8, 576, 49152)]
    {
        let x = Tensor::randn(0f32, 1., (m, k), &d).unwrap();
        let w = Tensor::randn(0f32, 1., (n, k), &d).unwrap();
        let wt = w.t().unwrap().contiguous().unwrap();
        for (name, rhs) in [("w.t()", w.t().unwrap()), ("wt contig", wt.clone())] {
            let _ = x.matmul(&rhs).unwrap();
            let iters = 200;
            let t = Instant::now();
            for _ in 0..iters {
                let _ = x.matmul(&rhs).unwrap();
            }
            let s = t.elapsed().as_secs_f64() / iters as f64;
            println!("m={m} k={k} n={n} {name}: {:.3} ms, {:.1} GFLOP/s", s * 1e3, 2.0 * (m * k * n) as f64 / s / 1e9);
        }
    }
}
