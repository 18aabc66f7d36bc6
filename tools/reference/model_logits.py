#!/usr/bin/env python3
"""Golden fixture for the model runtime, written once with Hugging Face
transformers (which loads GGUF directly) in a throw-away venv:

    python3 -m venv /tmp/refvenv && /tmp/refvenv/bin/pip install torch transformers gguf safetensors accelerate
    /tmp/refvenv/bin/python tools/reference/model_logits.py

Writes crates/model/tests/data/:
- smollm2_reference.safetensors + smollm2_reference.json: for fixed prompts
  (one through the chat template), the input ids from transformers' tokenizer,
  the f32 logits of the last position and of every position for 64 vocabulary
  columns, and 32 greedy tokens; from SmolLM2-135M-Instruct Q4_1 GGUF
  (dequantised to f32 by transformers).
- tiny-qwen2/, tiny-qwen3/: tiny random models saved with save_pretrained
  (config.json + model.safetensors) and their logits on fixed ids and greedy
  continuations, in reference.safetensors / reference.json.
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

OUT = os.path.join(os.path.dirname(__file__), "..", "..", "crates", "model", "tests", "data")
CACHE = os.environ.get("TABLETRACE_HOME", os.path.expanduser("~/.cache/tabletrace"))
GGUF_DIR = os.path.join(CACHE, "models", "smollm2-135m")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = [
    "The capital of France is",
    "SELECT name FROM singer WHERE age > 30;\n-- This query returns",
    "Question: which department has the most employees?\nTables: department(id, name, num_employees)\nAnswer step by step.",
]
CHAT = "Which table holds the employees' salaries: department or management?"
COLUMNS = list(range(0, 49152, 768))  # 64 columns spread over the vocabulary
GREEDY = 32


def greedy(model, ids, n):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def smollm2():
    tok = AutoTokenizer.from_pretrained(GGUF_DIR, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(GGUF_DIR, gguf_file=GGUF, torch_dtype=torch.float32)
    model.eval()
    chat = tok.apply_chat_template([{"role": "user", "content": CHAT}], tokenize=False, add_generation_prompt=True)
    texts = PROMPTS + [chat]
    tensors, meta = {}, {"columns": COLUMNS, "prompts": []}
    for i, text in enumerate(texts):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
        tensors[f"p{i}.last"] = logits[-1].contiguous()
        tensors[f"p{i}.columns"] = logits[:, COLUMNS].contiguous()
        meta["prompts"].append({"text": text, "ids": ids, "greedy": greedy(model, ids, GREEDY), "chat": i == len(texts) - 1})
    meta["chat_user_message"] = CHAT
    save_file(tensors, os.path.join(OUT, "smollm2_reference.safetensors"))
    json.dump(meta, open(os.path.join(OUT, "smollm2_reference.json"), "w"), indent=1)


def tiny(name, cls, cfg_cls, **extra):
    torch.manual_seed(0)
    cfg = cfg_cls(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0, rms_norm_eps=1e-6,
                  tie_word_embeddings=False, **extra)
    model = cls(cfg).float().eval()
    # Non-trivial norms and biases, so that a missing one shows.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in n else 0.0))
    d = os.path.join(OUT, name)
    model.save_pretrained(d, safe_serialization=True)
    ids = [[5, 17, 99, 3, 64, 120, 7, 8, 42, 1], [9, 9, 2, 77]]
    tensors, meta = {}, {"ids": ids, "greedy": []}
    for i, row in enumerate(ids):
        with torch.no_grad():
            tensors[f"r{i}.logits"] = model(torch.tensor([row])).logits[0].float().contiguous()
        meta["greedy"].append(greedy(model, row, GREEDY))
    save_file(tensors, os.path.join(d, "reference.safetensors"))
    json.dump(meta, open(os.path.join(d, "reference.json"), "w"), indent=1)


def main():
    os.makedirs(OUT, exist_ok=True)
    smollm2()
    tiny("tiny-qwen2", Qwen2ForCausalLM, Qwen2Config)
    tiny("tiny-qwen3", Qwen3ForCausalLM, Qwen3Config, head_dim=8)
    print("wrote", os.path.abspath(OUT), "with torch", torch.__version__, file=sys.stderr)


if __name__ == "__main__":
    main()
