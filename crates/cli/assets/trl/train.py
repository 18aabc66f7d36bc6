#!/usr/bin/env python3
"""The same training as tabletrace's, with TRL, on one or many GPUs.

Written by `tabletrace export trl`. Reads tabletrace_train.json (the run's
resolved config) and train.jsonl (its rows in the order tabletrace's trainer
visits them, every epoch written out), and trains the same LoRA adapter with
the same method, loss, optimizer and schedule:

    pip install torch transformers trl peft accelerate datasets gguf
    accelerate launch --config_file accelerate/zero2.yaml train.py    # or ddp, zero3, fsdp, cpu
    tabletrace eval --adapter out/adapter ...                         # the adapter reads back

Rows are read in file order (no shuffling), so the steps see tabletrace's
batches. The base model: --model, else the Hugging Face id in the config,
else the local GGUF tabletrace used (dequantised by transformers).
"""
import argparse
import json
import os

import torch
from datasets import Dataset
from peft import LoraConfig
from torch.utils.data import SequentialSampler
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))


def in_file_order(trainer_class):
    """The trainer with a sequential sampler: the rows are already in tabletrace's order."""

    class Ordered(trainer_class):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    return Ordered


def load(cfg, model_arg):
    source = model_arg or cfg["hf_model"] or cfg["gguf"]
    if source and source.endswith(".gguf"):
        folder, name = os.path.split(source)
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        # Dequantised on load: train it as the full-precision model it now is.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    else:
        tok = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16 if cfg["bf16"] else torch.float32)
    return model, tok


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="base model: a Hugging Face id or folder, or a .gguf file")
    ap.add_argument("--output-dir", default=os.path.join(HERE, "out"))
    ap.add_argument("--max-steps", type=int, help="stop earlier (default: the run's steps)")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (GPUs); default f32 as tabletrace on CPU")
    a = ap.parse_args()
    with open(os.path.join(HERE, "tabletrace_train.json")) as f:
        cfg = json.load(f)
    cfg["bf16"] = a.bf16
    model, tok = load(cfg, a.model)
    rows = [json.loads(line) for line in open(os.path.join(HERE, "train.jsonl")) if line.strip()]
    lora, opt, loss = cfg["lora"], cfg["optim"], cfg["loss"]
    peft_config = LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=lora["target_modules"],
        use_rslora=lora["use_rslora"],
        task_type="CAUSAL_LM",
    )
    common = dict(
        output_dir=a.output_dir,
        per_device_train_batch_size=cfg["batch_size"],
        gradient_accumulation_steps=cfg["grad_accum"],
        max_steps=a.max_steps or cfg["total_steps"],
        learning_rate=opt["lr"],
        weight_decay=opt["weight_decay"],
        adam_beta1=opt["beta1"],
        adam_beta2=opt["beta2"],
        adam_epsilon=opt["eps"],
        max_grad_norm=opt["max_grad_norm"],
        lr_scheduler_type=cfg["lr_scheduler_type"],
        warmup_steps=cfg["warmup_steps"],
        max_length=cfg["max_length"],
        seed=cfg["seed"],
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=a.bf16,
        gradient_checkpointing=cfg["activation_checkpointing"],
    )
    method = cfg["method"]
    if method in ("sft-qa", "sft-trace"):
        from trl import SFTConfig, SFTTrainer

        trainer_class, args = SFTTrainer, SFTConfig(completion_only_loss=True, **common)
    elif method == "dpo":
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(loss_type=[loss["loss_type"]], beta=loss["beta"], label_smoothing=loss["label_smoothing"], **common)
        trainer_class = DPOTrainer
    else:
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        args = CPOConfig(
            loss_type=loss["loss_type"],
            beta=loss["beta"],
            cpo_alpha=loss["cpo_alpha"],
            label_smoothing=loss["label_smoothing"],
            simpo_gamma=loss["simpo_gamma"],
            **common,
        )
        trainer_class = CPOTrainer
    trainer = in_file_order(trainer_class)(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok, peft_config=peft_config
    )
    trainer.train()
    with open(os.path.join(a.output_dir, "log_history.json"), "w") as f:
        json.dump(trainer.state.log_history, f, indent=1)
    trainer.model.save_pretrained(os.path.join(a.output_dir, "adapter"))
    print("adapter:", os.path.join(a.output_dir, "adapter"))


if __name__ == "__main__":
    main()
