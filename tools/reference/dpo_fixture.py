#!/usr/bin/env python3
"""Golden fixture for the DPO trainer, written once with TRL in a throw-away venv:

    scripts/setup-peers.sh torch
    ~/.cache/tabletrace/venv-torch/bin/python tools/reference/dpo_fixture.py

The same model, rows and LoRA adapter (closed formula, B non-zero) as
cpo_fixture.py. TRL's `DPOTrainer` (reference = the base model: PEFT's
adapter disabled, reference log-probs computed in the same step) runs one
forward and backward per case:

- `sigmoid`: -log σ(β Δ), Δ = (log π(y_w) - log π_ref(y_w)) - (log π(y_l) - log π_ref(y_l));
- `robust` with label smoothing ε (TRL 1.16's sigmoid ignores `label_smoothing`;
  its smoothed form is the robust loss);

and writes crates/train/tests/data/:

- dpo_fixture.json: TRL's tokenisation of the standard and conversational
  rows, and per case the loss, the metrics TRL logs, the reference
  log-probs and the global norm of all LoRA gradients;
- dpo_grads.safetensors: the LoRA gradients of layers 0 and 29, per case.
"""
import json
import os
import tempfile

import torch
from datasets import Dataset
from peft import LoraConfig
from safetensors.torch import save_file
from transformers import AutoTokenizer
from trl import DPOConfig, DPOTrainer

from cpo_fixture import (
    ALPHA,
    GGUF,
    GGUF_DIR,
    GRAD_LAYERS,
    MODULES,
    OUT,
    RANK,
    ROWS,
    conversational_rows,
    init_lora,
    load_base,
    lora_grads,
)

CASES = [
    {"name": "dpo-sigmoid", "loss_type": "sigmoid", "beta": 0.1},
    {"name": "dpo-robust", "loss_type": "robust", "beta": 0.5, "label_smoothing": 0.1},
]
METRICS = [
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
]


def dpo_trainer(tok, rows, tmp, **kw):
    """A DPOTrainer that wraps a fresh base model with a new LoRA adapter, so that the reference is the base
    model (PEFT's adapter disabled), then sets the adapter by the fixture's formula."""
    # bf16=False: TRL 1.16 defaults to bf16 autocast, which `compute_ref_log_probs` enters (the loss's own
    # reference forward does not): the fixture is f32 throughout, as our trainer is.
    args = DPOConfig(
        output_dir=tmp, report_to="none", max_length=512, per_device_train_batch_size=2, use_cpu=True, bf16=False, **kw
    )
    peft_config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=MODULES, task_type="CAUSAL_LM")
    trainer = DPOTrainer(
        model=load_base(), args=args, train_dataset=Dataset.from_list(rows), processing_class=tok, peft_config=peft_config
    )
    assert "ref" not in trainer.model.peft_config, "the reference must be the base model"
    init_lora(trainer.model)
    trainer.model.train()
    return trainer


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(GGUF_DIR, gguf_file=GGUF)
    tmp = tempfile.mkdtemp()
    meta = {"rank": RANK, "alpha": ALPHA, "modules": MODULES, "grad_layers": GRAD_LAYERS, "rows": ROWS, "cases": []}
    tensors = {}

    conversational = conversational_rows()
    meta["conversational_rows"] = conversational
    for fmt, rows in [("standard", ROWS), ("conversational", conversational)]:
        trainer = dpo_trainer(tok, rows, tmp)
        feats = [trainer.train_dataset[i] for i in range(len(rows))]
        batch = trainer.data_collator(feats)
        meta[f"tokenized_{fmt}"] = [
            {k: feats[i][k] for k in ["prompt_ids", "chosen_ids", "rejected_ids"]} for i in range(len(rows))
        ]
        meta[f"batch_{fmt}"] = {k: batch[k].tolist() for k in ["input_ids", "attention_mask", "completion_mask"]}
    meta["pad_token_id"] = tok.pad_token_id

    for case in CASES:
        kw = {k: v for k, v in case.items() if k != "name"}
        trainer = dpo_trainer(tok, ROWS, tmp, **kw)
        model = trainer.model
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(ROWS))])
        ref_chosen, ref_rejected = trainer.compute_ref_log_probs(model, batch)
        trainer._metrics["train"].clear()
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        grads, norm = lora_grads(model)
        for k, v in grads.items():
            tensors[f"{case['name']}/{k}"] = v
        logged = {k: trainer._metrics["train"][k][-1] for k in METRICS}
        meta["cases"].append(
            {
                **case,
                "loss": loss.item(),
                "metrics": logged,
                "ref_chosen_logps": ref_chosen.tolist(),
                "ref_rejected_logps": ref_rejected.tolist(),
                "grad_norm": norm,
            }
        )
        print(case["name"], loss.item(), logged)

    save_file(tensors, os.path.join(OUT, "dpo_grads.safetensors"))
    with open(os.path.join(OUT, "dpo_fixture.json"), "w") as f:
        json.dump(meta, f, indent=1)


if __name__ == "__main__":
    main()
