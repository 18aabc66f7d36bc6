#!/usr/bin/env python3
"""Checks that the Hugging Face stack loads what tabletrace writes:

    tabletrace adapter merge --model smollm2-135m --adapter RUN/adapter --out MERGED
    ~/.cache/tabletrace/venv-torch/bin/python tools/reference/check_peft_export.py RUN/adapter MERGED

loads SmolLM2 from the GGUF with our PEFT adapter on top (peft's
PeftModel.from_pretrained), and the merged folder with transformers, and
prints the max |Δ logit| between the two on a fixed prompt (and against the
base, to show the adapter matters). Exits 1 if they differ by more than 1e-3.
"""
import os
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

cache = os.environ.get("TABLETRACE_HOME", os.path.expanduser("~/.cache/tabletrace"))
gguf_dir, gguf = os.path.join(cache, "models", "smollm2-135m"), "SmolLM2-135M-Instruct.Q4_1.gguf"
adapter, merged = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf)
ids = torch.tensor([tok("Table t: a | b\n1 | 2\nQuestion: what is b?\nFinal answer:")["input_ids"]])
base = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf, torch_dtype=torch.float32)
with torch.no_grad():
    base_logits = base(ids).logits
    peft_logits = PeftModel.from_pretrained(base, adapter).eval()(ids).logits
    m = AutoModelForCausalLM.from_pretrained(merged, torch_dtype=torch.float32)
    merged_logits = m(ids).logits
    tok2 = AutoTokenizer.from_pretrained(merged)
d = (peft_logits - merged_logits).abs().max().item()
print(f"max |peft - merged| = {d:.2e}; max |peft - base| = {(peft_logits - base_logits).abs().max().item():.2e}; "
      f"tokenizer ids equal: {tok2(tok.decode(ids[0]))['input_ids'] == ids[0].tolist()}")
sys.exit(0 if d < 1e-3 else 1)
