//! Tokenizers from `tokenizer.json` or rebuilt from GGUF metadata, and chat
//! templates rendered with a real Jinja engine (minijinja).

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value as GgufValue;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A message with this role and content.
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        ChatMessage { role: role.to_string(), content: content.into() }
    }
}

/// A tokenizer with the special tokens and chat template of its model.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_id: Option<u32>,
    eos_ids: Vec<u32>,
    pad_id: Option<u32>,
    add_bos: bool,
    bos_token: String,
    eos_token: String,
    chat_template: Option<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab", &self.vocab_size())
            .field("bos_id", &self.bos_id)
            .field("eos_ids", &self.eos_ids)
            .field("add_bos", &self.add_bos)
            .finish()
    }
}

/// Pre-tokenizer split patterns by GGUF `tokenizer.ggml.pre` (as llama.cpp
/// and the models' own tokenizer.json define them). Each entry: the regex
/// applied before byte-level encoding, and whether GPT-2's own regex follows.
fn pre_tokenizer(pre: &str) -> Option<(Option<&'static str>, bool)> {
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    match pre {
        "default" | "gpt-2" | "gpt2" => Some((None, true)),
        // Single digits, then GPT-2's regex (SmolLM2, StarCoder).
        "smollm" | "starcoder" | "refact" => Some((Some(r"\p{N}"), true)),
        "llama-bpe" | "llama3" => Some((Some(LLAMA3), false)),
        "qwen2" | "deepseek-r1-qwen" => Some((Some(QWEN2), false)),
        _ => None,
    }
}

fn gguf_str<'a>(md: &'a HashMap<String, GgufValue>, key: &str) -> Option<&'a String> {
    md.get(key).and_then(|v| v.to_string().ok())
}

fn gguf_u32(md: &HashMap<String, GgufValue>, key: &str) -> Option<u32> {
    md.get(key).and_then(|v| v.to_u32().ok())
}

impl Tokenizer {
    /// Rebuilds the tokenizer stored in GGUF metadata (byte-level BPE:
    /// `tokenizer.ggml.model = gpt2`), with its special tokens and chat template.
    pub fn from_gguf(md: &HashMap<String, GgufValue>) -> Result<Tokenizer> {
        let err = |m: String| Error::Tokenizer(m);
        let model = gguf_str(md, "tokenizer.ggml.model")
            .ok_or_else(|| err("GGUF metadata has no tokenizer.ggml.model".into()))?;
        if model != "gpt2" {
            return Err(err(format!(
                "GGUF tokenizer model {model:?} is not supported (only byte-level BPE, \"gpt2\"); load the model from a Hugging Face folder with tokenizer.json"
            )));
        }
        let pre_name = gguf_str(md, "tokenizer.ggml.pre").map(String::as_str).unwrap_or("default");
        let (split, gpt2_regex) = pre_tokenizer(pre_name).ok_or_else(|| {
            err(format!(
                "GGUF pre-tokenizer {pre_name:?} is not supported (supported: default, gpt2, smollm, llama-bpe, qwen2)"
            ))
        })?;
        let tokens = md
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.to_vec().ok())
            .ok_or_else(|| err("GGUF metadata has no tokenizer.ggml.tokens".into()))?;
        let tokens: Vec<&str> = tokens.iter().map(|t| t.to_string().map(String::as_str).unwrap_or("")).collect();
        let types: Vec<i32> = md
            .get("tokenizer.ggml.token_type")
            .and_then(|v| v.to_vec().ok())
            .map(|v| v.iter().map(|t| t.to_i32().unwrap_or(1)).collect())
            .unwrap_or_default();
        let merges: Vec<&str> = md
            .get("tokenizer.ggml.merges")
            .and_then(|v| v.to_vec().ok())
            .map(|v| v.iter().filter_map(|m| m.to_string().ok().map(String::as_str)).collect())
            .unwrap_or_default();
        let vocab: serde_json::Map<String, serde_json::Value> =
            tokens.iter().enumerate().map(|(i, t)| (t.to_string(), serde_json::Value::from(i as u32))).collect();
        // Control (3) and user-defined (4) tokens are matched whole in text.
        let added: Vec<serde_json::Value> = tokens
            .iter()
            .enumerate()
            .filter(|(i, _)| matches!(types.get(*i), Some(3) | Some(4)))
            .map(|(i, t)| {
                serde_json::json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                    "normalized": false, "special": types.get(i) == Some(&3)})
            })
            .collect();
        let byte_level = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": gpt2_regex});
        let pre = match split {
            Some(re) => serde_json::json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false}, byte_level]}),
            None => byte_level.clone(),
        };
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
            "pre_tokenizer": pre, "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": merges}
        });
        let inner = tokenizers::Tokenizer::from_bytes(json.to_string().as_bytes())
            .map_err(|e| err(format!("cannot build the GGUF tokenizer: {e}")))?;
        let token = |key: &str| gguf_u32(md, key).and_then(|id| tokens.get(id as usize).map(|t| (id, t.to_string())));
        let bos = token("tokenizer.ggml.bos_token_id");
        let eos = token("tokenizer.ggml.eos_token_id");
        let mut eos_ids: Vec<u32> = eos.iter().map(|e| e.0).collect();
        if let Some(eot) = gguf_u32(md, "tokenizer.ggml.eot_token_id") {
            if !eos_ids.contains(&eot) {
                eos_ids.push(eot);
            }
        }
        Ok(Tokenizer {
            inner,
            bos_id: bos.as_ref().map(|b| b.0),
            eos_ids,
            pad_id: gguf_u32(md, "tokenizer.ggml.padding_token_id"),
            add_bos: md.get("tokenizer.ggml.add_bos_token").and_then(|v| v.to_bool().ok()).unwrap_or(false),
            bos_token: bos.map(|b| b.1).unwrap_or_default(),
            eos_token: eos.map(|e| e.1).unwrap_or_default(),
            chat_template: gguf_str(md, "tokenizer.chat_template").cloned(),
        })
    }

    /// Loads `tokenizer.json`, with special tokens and the chat template from
    /// `tokenizer_config.json` (or `chat_template.jinja`) and EOS ids from
    /// `generation_config.json` when present.
    pub fn from_hf_folder(dir: &Path) -> Result<Tokenizer> {
        let path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        let read_json = |name: &str| -> Option<serde_json::Value> {
            std::fs::read_to_string(dir.join(name)).ok().and_then(|t| serde_json::from_str(&t).ok())
        };
        let cfg = read_json("tokenizer_config.json").unwrap_or_default();
        let token_text = |key: &str| -> Option<String> {
            match cfg.get(key)? {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(str::to_string),
                _ => None,
            }
        };
        let bos_token = token_text("bos_token");
        let eos_token = token_text("eos_token");
        let mut eos_ids: Vec<u32> = eos_token.iter().filter_map(|t| inner.token_to_id(t)).collect();
        if let Some(gen) = read_json("generation_config.json") {
            let ids: Vec<u64> = match gen.get("eos_token_id") {
                Some(serde_json::Value::Number(n)) => n.as_u64().into_iter().collect(),
                Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_u64()).collect(),
                _ => vec![],
            };
            for id in ids {
                if !eos_ids.contains(&(id as u32)) {
                    eos_ids.push(id as u32);
                }
            }
        }
        let chat_template = std::fs::read_to_string(dir.join("chat_template.jinja"))
            .ok()
            .or_else(|| cfg.get("chat_template").and_then(|t| t.as_str()).map(str::to_string));
        Ok(Tokenizer {
            bos_id: bos_token.as_ref().and_then(|t| inner.token_to_id(t)),
            pad_id: token_text("pad_token").and_then(|t| inner.token_to_id(&t)),
            add_bos: cfg.get("add_bos_token").and_then(|b| b.as_bool()).unwrap_or(false),
            bos_token: bos_token.unwrap_or_default(),
            eos_token: eos_token.unwrap_or_default(),
            eos_ids,
            chat_template,
            inner,
        })
    }

    /// Encodes text; special tokens written in the text (`<|im_start|>`) map
    /// to their ids. With `add_bos`, the BOS token is prepended when the
    /// model's tokenizer asks for it.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| Error::Tokenizer(format!("encode: {e}")))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_bos && self.add_bos {
            if let Some(b) = self.bos_id {
                ids.push(b);
            }
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Decodes ids to text, dropping special tokens when `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(|e| Error::Tokenizer(format!("decode: {e}")))
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids that end generation.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// The BOS id, if the model has one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// Whether prompts start with BOS.
    pub fn adds_bos(&self) -> bool {
        self.add_bos
    }

    /// The id used to pad batches: the pad token, else the first EOS, else 0.
    pub fn pad_id(&self) -> u32 {
        self.pad_id.or(self.eos_ids.first().copied()).unwrap_or(0)
    }

    /// The EOS token's text (appended to training completions).
    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }

    /// The id of a token, if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` (BOS/EOS/pad
    /// tokens, chat template) into `dir`, as a Hugging Face folder has them.
    pub fn save_hf(&self, dir: &std::path::Path) -> Result<()> {
        let path = dir.join("tokenizer.json");
        self.inner.save(&path, false).map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        let pad = self.inner.id_to_token(self.pad_id());
        let cfg = serde_json::json!({
            "bos_token": (!self.bos_token.is_empty()).then_some(&self.bos_token),
            "eos_token": &self.eos_token,
            "pad_token": pad,
            "add_bos_token": self.add_bos,
            "chat_template": &self.chat_template,
            "tokenizer_class": "PreTrainedTokenizerFast",
        });
        let path = dir.join("tokenizer_config.json");
        std::fs::write(&path, serde_json::to_string_pretty(&cfg).expect("json"))
            .map_err(|source| Error::Io { path, source })
    }

    /// The model's chat template, if it has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Renders messages with the model's chat template, as Hugging Face's
    /// `apply_chat_template(messages, add_generation_prompt=...)` does.
    pub fn apply_chat_template(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let template = self
            .chat_template
            .as_deref()
            .ok_or_else(|| Error::Template("the model has no chat template; pass a plain prompt instead".into()))?;
        render_chat_template(template, messages, add_generation_prompt, &self.bos_token, &self.eos_token)
    }
}

/// Renders a Hugging Face chat template (Jinja, with Python string methods).
pub fn render_chat_template(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> Result<String> {
    let mut env = minijinja::Environment::new();
    // transformers renders with trim_blocks and lstrip_blocks.
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
        Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
    });
    env.add_function("strftime_now", |_fmt: String| -> String { String::new() });
    env.add_template("chat", template).map_err(|e| Error::Template(format!("does not parse: {e}")))?;
    let tmpl = env.get_template("chat").map_err(|e| Error::Template(e.to_string()))?;
    tmpl.render(minijinja::context! {
        messages => messages,
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token,
        eos_token => eos_token,
    })
    .map_err(|e| Error::Template(format!("does not render: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_chatml_template_with_python_methods() {
        let t = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'].strip() + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
        let out = render_chat_template(t, &[ChatMessage::new("user", "  hi  ")], true, "", "").unwrap();
        assert_eq!(out, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn template_errors_are_clear() {
        let e = render_chat_template("{% if %}", &[], false, "", "").unwrap_err().to_string();
        assert!(e.contains("does not parse"), "{e}");
        let e = render_chat_template("{{ raise_exception('only user and assistant roles') }}", &[], false, "", "")
            .unwrap_err()
            .to_string();
        assert!(e.contains("only user and assistant roles"), "{e}");
    }
}
