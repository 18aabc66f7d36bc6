//! `tabletrace bench generate`: prefill and decode speed and peak memory of
//! the model runtime, printed as one JSON line (the peers' scripts print the
//! same fields, so tools/bench/model.sh can put them side by side).
//! `tabletrace bench matmul`: candle's f32 matmul GFLOP/s (the trainer's
//! products), beside which tools/bench/train.sh reports a step's FLOP rate.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use tabletrace_model::{generate, load_model, GenerateOptions, LoadOptions, Sampling};

#[derive(Debug, Args)]
pub struct BenchGenerateArgs {
    /// A short name, a .gguf file or a Hugging Face folder.
    #[arg(long, default_value = "smollm2-135m")]
    model: String,
    /// Run on the GGUF's stored quantisation.
    #[arg(long)]
    quantized: bool,
    /// Prompt length for the prefill measurement, in tokens.
    #[arg(long, default_value_t = 256)]
    prompt_tokens: usize,
    /// Tokens decoded per row for the decode measurement.
    #[arg(long, default_value_t = 64)]
    new_tokens: usize,
    /// Batch sizes to decode at.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    batch: Vec<usize>,
    /// Decode with nucleus sampling at this temperature (0: greedy), as the
    /// trace factory draws negatives.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Nucleus mass for sampling.
    #[arg(long, default_value_t = 0.95)]
    top_p: f64,
    /// Also time N sampled continuations (`--new-tokens` each, temperature
    /// 0.8 unless `--temperature`) of the `--prompt-tokens` prompt: in one
    /// call (one prefill shared by the N rows) and as N separate calls.
    #[arg(long)]
    samples: Option<usize>,
}

#[derive(Debug, Args)]
pub struct BenchMatmulArgs {
    /// Square matrix size.
    #[arg(long, default_value_t = 4096)]
    n: usize,
}

/// Best of five `n × n` f32 products after a warm-up, as one JSON line.
pub fn matmul(a: BenchMatmulArgs) -> anyhow::Result<ExitCode> {
    let dev = candle_core::Device::Cpu;
    let x = candle_core::Tensor::randn(0f32, 1.0, (a.n, a.n), &dev)?;
    let y = candle_core::Tensor::randn(0f32, 1.0, (a.n, a.n), &dev)?;
    x.matmul(&y)?;
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        x.matmul(&y)?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    let gflops = 2.0 * (a.n as f64).powi(3) / best / 1e9;
    let line = serde_json::json!({ "impl": "candle", "threads": rayon::current_num_threads(), "n": a.n, "matmul_gflops": gflops });
    println!("{line}");
    Ok(ExitCode::SUCCESS)
}

/// Peak resident memory of this process (VmHWM), in MiB.
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

pub fn run(a: BenchGenerateArgs) -> anyhow::Result<ExitCode> {
    let opts = LoadOptions { quantized: a.quantized, ..LoadOptions::default() };
    let m = load_model(&a.model, &opts).with_context(|| format!("loading {}", a.model))?;
    // A fixed, deterministic prompt of the requested length.
    // (~14 tokens per repetition; tools/bench/model_peers.py uses the same text.)
    let text = "Question: which department headed by an acting manager has the most employees? ".repeat(256);
    let mut ids = m.tokenizer.encode(&text, true)?;
    anyhow::ensure!(ids.len() >= a.prompt_tokens, "the benchmark text has only {} tokens", ids.len());
    ids.truncate(a.prompt_tokens);

    // Prefill: one forward over the prompt (best of 3 after a warm-up).
    let prefill = GenerateOptions { max_new_tokens: 1, ignore_eos: true, ..GenerateOptions::default() };
    generate(&m.model, &m.tokenizer, std::slice::from_ref(&ids), &prefill)?;
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t = Instant::now();
        generate(&m.model, &m.tokenizer, std::slice::from_ref(&ids), &prefill)?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    let prefill_tps = a.prompt_tokens as f64 / best;

    // Decode: a short prompt, then `new_tokens` per row; the prefill of the
    // short prompt is timed separately and subtracted. Best of three each.
    let short: Vec<u32> = ids[..ids.len().min(16)].to_vec();
    let mut decode = serde_json::Map::new();
    for &b in &a.batch {
        let rows = vec![short.clone(); b];
        let one = GenerateOptions { max_new_tokens: 1, ignore_eos: true, ..GenerateOptions::default() };
        let sampling = if a.temperature > 0.0 {
            Sampling::Sample { temperature: a.temperature, top_p: a.top_p, seed: 1 }
        } else {
            Sampling::Greedy
        };
        let full =
            GenerateOptions { max_new_tokens: a.new_tokens, ignore_eos: true, sampling, ..GenerateOptions::default() };
        // Best of three (this VM's speed varies from run to run).
        let (mut t_prefill, mut t_full) = (f64::INFINITY, f64::INFINITY);
        for _ in 0..3 {
            let t = Instant::now();
            generate(&m.model, &m.tokenizer, &rows, &one)?;
            t_prefill = t_prefill.min(t.elapsed().as_secs_f64());
            let t = Instant::now();
            generate(&m.model, &m.tokenizer, &rows, &full)?;
            t_full = t_full.min(t.elapsed().as_secs_f64());
        }
        let secs = (t_full - t_prefill).max(1e-9);
        decode.insert(format!("decode_b{b}_tok_s"), serde_json::json!((b * (a.new_tokens - 1)) as f64 / secs));
    }
    let mut out = serde_json::json!({
        "impl": "tabletrace",
        "model": a.model,
        "weights": if a.quantized { "quantized" } else { "f32" },
        "threads": candle_core::utils::get_num_threads(),
        "prompt_tokens": a.prompt_tokens,
        "temperature": a.temperature,
        "prefill_tok_s": prefill_tps,
    });
    out.as_object_mut().expect("an object").extend(decode);
    if let Some(n) = a.samples {
        // Once each: at these lengths a run takes tens of seconds.
        let temperature = if a.temperature > 0.0 { a.temperature } else { 0.8 };
        let opts = |seeds: Vec<u64>| GenerateOptions {
            max_new_tokens: a.new_tokens,
            ignore_eos: true,
            sampling: Sampling::Sample { temperature, top_p: a.top_p, seed: 1 },
            row_seeds: seeds,
            ..GenerateOptions::default()
        };
        let t = Instant::now();
        generate(&m.model, &m.tokenizer, &vec![ids.clone(); n], &opts((0..n as u64).collect()))?;
        let shared = t.elapsed().as_secs_f64();
        let t = Instant::now();
        for seed in 0..n as u64 {
            generate(&m.model, &m.tokenizer, std::slice::from_ref(&ids), &opts(vec![seed]))?;
        }
        let separate = t.elapsed().as_secs_f64();
        out["samples"] = serde_json::json!({
            "n": n, "prompt_tokens": a.prompt_tokens, "new_tokens": a.new_tokens,
            "one_call_s": shared, "separate_calls_s": separate, "speedup": separate / shared,
        });
    }
    out["peak_rss_mib"] = serde_json::json!(peak_rss_mib());
    println!("{out}");
    Ok(ExitCode::SUCCESS)
}
