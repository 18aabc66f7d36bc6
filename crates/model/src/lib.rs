//! tabletrace's LLM runtime on candle: trainable decoder-only models.
//!
//! - [`load_model`] resolves a spec (a short name such as `smollm2-135m`, a
//!   `.gguf` file, a Hugging Face folder, or a hub id in the local cache) and
//!   returns a [`LoadedModel`]: the [`Model`] and its [`Tokenizer`].
//! - [`Model::forward`] returns logits for every position (training) or the
//!   last one (decoding), with per-row positions, an additive mask and an
//!   optional key/value [`Cache`]. Its ops are differentiable ([`ops`]).
//! - [`Tokenizer`] encodes and decodes, and renders the model's chat template
//!   ([`Tokenizer::apply_chat_template`]).
//! - [`generate`] runs batched generation ([`GenerateOptions`], [`Sampling`]).
//!
//! ```no_run
//! use tabletrace_model::{generate, load_model, ChatMessage, GenerateOptions, LoadOptions};
//!
//! let m = load_model("smollm2-135m", &LoadOptions::default())?;
//! let prompt = m.tokenizer.apply_chat_template(&[ChatMessage::new("user", "What is 2 + 2?")], true)?;
//! let ids = m.tokenizer.encode(&prompt, true)?;
//! let out = generate(&m.model, &m.tokenizer, &[ids], &GenerateOptions::default())?;
//! println!("{}", out[0].text);
//! # Ok::<(), tabletrace_model::Error>(())
//! ```
#![deny(missing_docs)]

mod checkpoint;
mod config;
mod decoder;
mod error;
mod export;
mod frozen;
mod generate;
pub mod kernels;
mod loader;
mod lora;
pub mod ops;
mod tokenizer;

pub use checkpoint::{read_gguf, read_hf_folder, Checkpoint, RopeLayout};
pub use config::{Arch, Llama3RopeScaling, ModelConfig};
pub use decoder::{causal_mask, padded_causal_mask, Adapter, Cache, Linear, LinearWeight, Model, Proj};
pub use error::{Error, Result};
pub use export::{export_merged, hf_config};
pub use frozen::Frozen;
pub use generate::{generate, generate_tokens, sample, FinishReason, GenerateOptions, Generation, Rng, Sampling};
pub use loader::{
    cache_dir, load_model, load_tokenizer, resolve, same_model, KnownModel, LoadOptions, LoadedModel, ModelSource,
    KNOWN_MODELS,
};
pub use lora::{peft_name, Lora, LoraConfig, LoraPair};
pub use tokenizer::{render_chat_template, ChatMessage, Tokenizer};
