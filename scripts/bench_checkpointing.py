"""Activation checkpointing in one PPO forward+backward: peak memory and time, with and without.
Each setting runs in a fresh subprocess (peak RSS is per process); SmolLM2-135M + the explainer
LoRA, B sequences of T tokens, the PPO loss's log-probs through kernels.selected_logprobs.
A benchmark, not a test: read the ratio on a noisy shared CPU.

    python scripts/bench_checkpointing.py --batch 8 --tokens 252
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def one(a):
    sys.path.insert(0, str(ROOT))
    import torch
    import llm
    b = llm.LLM(a.model, a.dtype)
    b.attach({"explainer": None})
    params = b.trainable("explainer")
    b.model.eval()
    b.activation_checkpointing(a.checkpoint)
    g = torch.Generator().manual_seed(0)
    V = b.base.config.vocab_size
    prompt_len = a.tokens - a.completion
    prompts = [torch.randint(0, V, (prompt_len,), generator=g).tolist() for _ in range(a.batch)]
    comps = [torch.randint(0, V, (a.completion,), generator=g).tolist() for _ in range(a.batch)]
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    with b.use("explainer"):
        for _ in range(a.repeats):
            t0 = time.time()
            lp = b.completion_logprobs(prompts, comps)
            loss = -torch.cat(lp).mean()
            loss.backward()
            times.append(time.time() - t0)
            for p in params:
                p.grad = None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"checkpoint": a.checkpoint, "peak_rss_gb": peak / 2**20,
                      "rss_before_gb": rss0 / 2**20, "seconds": sorted(times)[len(times) // 2]}))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=252, help="prompt + completion tokens per sequence")
    p.add_argument("--completion", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--checkpoint", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.checkpoint is not None:
        a.checkpoint = bool(a.checkpoint)
        return one(a)
    rows = []
    for ck in (0, 1, 0, 1):  # alternate, twice
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--checkpoint", str(ck)],
                             capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
        print(rows[-1], flush=True)
    print(f"\none PPO forward+backward, {a.batch} x {a.tokens} tokens ({a.completion} completion), "
          f"{a.model} {a.dtype}, LoRA q/v; peak RSS of the process (median time of {a.repeats}):")
    print("| activation checkpointing | peak RSS (GB) | seconds |\n|---|---|---|")
    for ck in (False, True):
        r = [x for x in rows if x["checkpoint"] == ck]
        print(f"| {'on' if ck else 'off'} | {max(x['peak_rss_gb'] for x in r):.2f} | "
              f"{min(x['seconds'] for x in r):.1f} |")


if __name__ == "__main__":
    main()
