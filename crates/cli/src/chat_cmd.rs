//! `tabletrace chat`: one user turn through the model's chat template.

use std::io::Read;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use tabletrace_model::{generate, load_model, ChatMessage, GenerateOptions, LoadOptions, Sampling};

#[derive(Debug, Args)]
pub struct ChatArgs {
    /// A short name (smollm2-135m, qwen2.5-coder-0.5b), a .gguf file, a Hugging Face folder or a hub id.
    #[arg(long)]
    model: String,
    /// The user's message. Default: read from stdin.
    #[arg(long)]
    prompt: Option<String>,
    /// Take the most likely token each step (default: sample at temperature 0.7, top-p 0.9).
    #[arg(long)]
    greedy: bool,
    /// Sampling temperature.
    #[arg(long, default_value_t = 0.7)]
    temperature: f64,
    /// Nucleus sampling threshold.
    #[arg(long, default_value_t = 0.9)]
    top_p: f64,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// New tokens at most.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Run on the GGUF's stored quantisation instead of f32 weights.
    #[arg(long)]
    quantized: bool,
    /// A system message (none unless given or the template adds one).
    #[arg(long)]
    system: Option<String>,
}

pub fn run(a: ChatArgs) -> anyhow::Result<ExitCode> {
    let prompt = match a.prompt {
        Some(p) => p,
        None => {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s).context("reading the prompt from stdin")?;
            s
        }
    };
    let opts = LoadOptions { quantized: a.quantized, ..LoadOptions::default() };
    let m = load_model(&a.model, &opts).with_context(|| format!("loading model {}", a.model))?;
    let mut messages = Vec::new();
    if let Some(s) = a.system {
        messages.push(ChatMessage::new("system", s));
    }
    messages.push(ChatMessage::new("user", prompt));
    let text = m.tokenizer.apply_chat_template(&messages, true)?;
    let ids = m.tokenizer.encode(&text, true)?;
    let sampling = if a.greedy {
        Sampling::Greedy
    } else {
        Sampling::Sample { temperature: a.temperature, top_p: a.top_p, seed: a.seed }
    };
    let gen = GenerateOptions { max_new_tokens: a.max_tokens, sampling, ..GenerateOptions::default() };
    let out = generate(&m.model, &m.tokenizer, &[ids], &gen)?;
    println!("{}", out[0].text.trim_end());
    Ok(ExitCode::SUCCESS)
}
