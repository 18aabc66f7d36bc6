//! Training attention (`ops::attention` with a tracked query, forward and
//! backward) on one preference row of the study's length at
//! Qwen2.5-0.5B's shapes: 2 key/value heads of 64, 7 query heads each, a
//! `[prompt | chosen | rejected]` row whose rejected part does not see the
//! chosen one (`PROMPT`, `COMPLETION` tokens; default 3,000 and 256).
//! Prints the best of `REPS` (default 3) forward and backward times of one
//! layer (`ops::attention` under a gradient: the blocked kernels where the
//! CPU has AVX-512F), and the forward without a graph by the inference
//! path (`ops::attention`) and by training's (`ops::blocked_attention`).
//!
//! `cargo run --release -p tabletrace-model --example span_attention`
use candle_core::{DType, Device, Tensor, Var};
use std::time::{Duration, Instant};

// The CLI's allocator: the kernels' buffers come back from it as they do in training.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).map_or(default, |v| v.parse().expect("a number"))
}

fn main() -> candle_core::Result<()> {
    let (kv, g, d) = (2, 7, 64);
    let (p, c) = (env("PROMPT", 3000), env("COMPLETION", 256));
    let t = p + 2 * c;
    let dev = Device::Cpu;
    // Row i sees key j when j ≤ i, except rejected rows seeing chosen keys.
    let mut mask = vec![0f32; t * t];
    for i in 0..t {
        for j in 0..t {
            let hidden = j > i || (i >= p + c && (p..p + c).contains(&j));
            if hidden {
                mask[i * t + j] = f32::NEG_INFINITY;
            }
        }
    }
    let mask = Tensor::from_vec(mask, (1, t, t), &dev)?;
    let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, kv, g * t, d), &dev)?)?;
    let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, kv, t, d), &dev)?)?;
    let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, kv, t, d), &dev)?)?;
    let weight = Tensor::randn(0f32, 1.0, (1, kv, g * t, d), &dev)?;
    println!("threads {}, T = {t} ({p} + 2 × {c})", rayon::current_num_threads());
    let (mut fwd, mut bwd) = (Duration::MAX, Duration::MAX);
    let mut check = 0f32;
    for _ in 0..env("REPS", 3) {
        let start = Instant::now();
        let out = tabletrace_model::ops::attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), Some(&mask), 0.125)?;
        fwd = fwd.min(start.elapsed());
        let loss = (out * &weight)?.sum_all()?;
        let start = Instant::now();
        let grads = loss.backward()?;
        bwd = bwd.min(start.elapsed());
        check = grads.get(&q).expect("dq").sqr()?.sum_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
    }
    println!(
        "forward {:.1} ms, backward {:.1} ms (one layer; |dq|² {check:.6e})",
        fwd.as_secs_f64() * 1e3,
        bwd.as_secs_f64() * 1e3
    );
    let (qd, kd, vd) = (q.as_tensor().detach(), k.as_tensor().detach(), v.as_tensor().detach());
    let (mut inference, mut blocked) = (Duration::MAX, Duration::MAX);
    for _ in 0..env("REPS", 3) {
        let start = Instant::now();
        std::hint::black_box(tabletrace_model::ops::attention(&qd, &kd, &vd, Some(&mask), 0.125)?);
        inference = inference.min(start.elapsed());
        let start = Instant::now();
        std::hint::black_box(tabletrace_model::ops::blocked_attention(&qd, &kd, &vd, Some(&mask), 0.125)?);
        blocked = blocked.min(start.elapsed());
    }
    println!(
        "without a graph: inference path {:.1} ms, blocked {:.1} ms",
        inference.as_secs_f64() * 1e3,
        blocked.as_secs_f64() * 1e3
    );
    Ok(())
}
