#!/usr/bin/env python3
"""Peer of tools/bench/train.sh: TRL's CPOTrainer on the same pairs and
config (the model f32 from the GGUF, LoRA r=16 on all seven projections,
one micro-batch of all pairs, sigmoid loss), timing each optimizer step.

    make  PAIRS:  train_peer.py make GGUF_DIR GGUF OUT.jsonl N PROMPT COMPLETION   (N pairs of that many tokens)
    run   TRL:    train_peer.py trl GGUF_DIR GGUF PAIRS.jsonl THREADS STEPS MAX_LENGTH
    peak:         train_peer.py peak THREADS   (torch f32 matmul GFLOP/s, 4096²)
Prints one JSON line.
"""
import json
import random
import resource
import sys
import tempfile
import time


def load_tok(d, f):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(d, gguf_file=f)


def make(d, f, out, n, prompt, completion):
    tok = load_tok(d, f)
    rng = random.Random(0)
    words = [w for w in (tok.decode([i]) for i in range(300, 20000)) if w.startswith(" ") and w[1:].isalpha()]

    def text(n):
        # Grow word by word until the text has n tokens.
        s = ""
        while len(tok(s, add_special_tokens=False)["input_ids"]) < n:
            s += rng.choice(words)
        ids = tok(s, add_special_tokens=False)["input_ids"][:n]
        return tok.decode(ids)

    with open(out, "w") as fh:
        for i in range(n):
            fh.write(json.dumps({"prompt": text(prompt - 1), "chosen": text(completion - 1),
                                 "rejected": text(completion - 1), "id": f"bench{i}"}) + "\n")


def trl(d, f, pairs, threads, steps, max_length):
    import torch
    torch.set_num_threads(threads)
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    tok = load_tok(d, f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32)
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    rows = [json.loads(l) for l in open(pairs)]
    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)

    args = CPOConfig(
        output_dir=tempfile.mkdtemp(), report_to="none", max_length=max_length, per_device_train_batch_size=len(rows),
        max_steps=steps, learning_rate=2e-4, use_cpu=True, logging_steps=1, save_strategy="no",
        dataloader_num_workers=0, beta=0.1,
    )
    peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    trainer = CPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=peft, callbacks=[Timer()])
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    tokens = int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum())
    trainer.train()
    step = sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else times[0]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"impl": "trl", "threads": threads, "tokens_per_step": tokens, "step_s": step,
                      "tokens_per_s": tokens / step, "peak_rss_mib": rss}))


def peak(threads):
    import torch
    torch.set_num_threads(threads)
    n = 4096
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    print(json.dumps({"threads": threads, "matmul_gflops": 2 * n**3 / best / 1e9}))


if __name__ == "__main__":
    if sys.argv[1] == "peak":
        peak(int(sys.argv[2]))
    elif sys.argv[1] == "make":
        make(*sys.argv[2:5], *map(int, sys.argv[5:8]))
    else:
        trl(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7]))
