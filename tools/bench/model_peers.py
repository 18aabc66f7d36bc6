#!/usr/bin/env python3
"""Peers for `tabletrace bench generate`: the same measurements with Hugging
Face transformers (f32) or llama.cpp (llama-cpp-python, the GGUF as stored),
printed as one JSON line with the same field names.

    python model_peers.py transformers GGUF_PATH THREADS [PROMPT_TOKENS NEW_TOKENS]
    python model_peers.py llama        GGUF_PATH THREADS [PROMPT_TOKENS NEW_TOKENS]
"""
import json
import os
import resource
import sys
import time

TEXT = "Question: which department headed by an acting manager has the most employees? " * 256


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def bench_transformers(path, threads, n_prompt, n_new):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    d, f = os.path.dirname(path), os.path.basename(path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32).eval()
    ids = torch.tensor([tok(TEXT, add_special_tokens=False)["input_ids"][:n_prompt]])
    out = {"impl": "transformers", "weights": "f32", "threads": threads, "prompt_tokens": n_prompt}
    with torch.no_grad():
        model(ids)
        best = min(_timed(lambda: model(ids)) for _ in range(3))
        out["prefill_tok_s"] = n_prompt / best
        short = ids[:, :16]
        for b in (1, 8):
            rows = short.repeat(b, 1)
            gen = lambda n: model.generate(rows, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
            t1 = min(_timed(lambda: gen(1)) for _ in range(3))
            tn = min(_timed(lambda: gen(n_new)) for _ in range(3))
            out[f"decode_b{b}_tok_s"] = b * (n_new - 1) / max(tn - t1, 1e-9)
    out["peak_rss_mib"] = peak_rss_mib()
    return out


def bench_llama(path, threads, n_prompt, n_new):
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=n_prompt + n_new + 64, n_batch=512, verbose=False)
    ids = llm.tokenize(TEXT.encode(), add_bos=False)[:n_prompt]
    out = {"impl": "llama.cpp", "weights": "gguf", "threads": threads, "prompt_tokens": n_prompt}

    def prefill():
        llm.reset()
        llm.eval(ids)

    prefill()
    out["prefill_tok_s"] = n_prompt / min(_timed(prefill) for _ in range(3))

    def decode(n):
        llm.reset()
        llm.eval(ids[:16])
        for _ in range(n):
            t = llm.sample(temp=0.0)
            llm.eval([t])

    t1 = min(_timed(lambda: decode(1)) for _ in range(3))
    tn = min(_timed(lambda: decode(n_new)) for _ in range(3))
    out["decode_b1_tok_s"] = (n_new - 1) / max(tn - t1, 1e-9)
    out["peak_rss_mib"] = peak_rss_mib()
    return out


def _timed(f):
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


if __name__ == "__main__":
    which, path, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    n_prompt = int(sys.argv[4]) if len(sys.argv) > 4 else 256
    n_new = int(sys.argv[5]) if len(sys.argv) > 5 else 64
    fn = {"transformers": bench_transformers, "llama": bench_llama}[which]
    print(json.dumps(fn(path, threads, n_prompt, n_new)))
