#!/usr/bin/env python3
"""Greedy continuations by llama.cpp (llama-cpp-python), for tests that
compare ours with it on the same GGUF file.

Reads JSON from stdin: {"model": PATH, "prompts": [[token ids], ...],
"new_tokens": N, "threads": T}. Writes JSON to stdout: one object per prompt,
{"tokens": [N greedy ids], "margins": [top-1 minus top-2 logit at each step]}.
"""
import json
import sys

import numpy as np
from llama_cpp import Llama


def main():
    req = json.load(sys.stdin)
    longest = max(len(p) for p in req["prompts"]) + req["new_tokens"]
    llm = Llama(
        model_path=req["model"],
        n_ctx=max(512, longest + 8),
        n_threads=req.get("threads", 2),
        n_threads_batch=req.get("threads", 2),
        logits_all=True,
        verbose=False,
    )
    out = []
    for prompt in req["prompts"]:
        llm.reset()
        llm.eval(prompt)
        tokens, margins = [], []
        for _ in range(req["new_tokens"]):
            logits = np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float64)
            top2 = np.argsort(logits)[-2:]
            tokens.append(int(top2[1]))
            margins.append(float(logits[top2[1]] - logits[top2[0]]))
            llm.eval([tokens[-1]])
        out.append({"tokens": tokens, "margins": margins})
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
