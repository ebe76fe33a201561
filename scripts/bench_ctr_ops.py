"""Benchmark of ctr_ops.py's kernels against the torch layers they replace, at DIN's shapes.

Side by side in one process, interleaved round by round (a noisy core slows every row alike),
forward + backward of each operation on random inputs at batch --batch (history length 10,
activation-unit width 36, MLP width 128), and a few single torch ops on the same 1.5M-float
tensor, which show why the kernels avoid bool tensors and dropout's bernoulli_. Prints ms per
call (median over rounds). Not a test: nothing here checks a speed.

    python scripts/bench_ctr_ops.py --threads 2
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ctr_ops  # noqa: E402


def cases(B: int, K: int = 10, H: int = 36, M: int = 128) -> dict:
    torch.manual_seed(0)
    P = torch.randn(B, K, H, requires_grad=True)
    Q = torch.randn(B, H, requires_grad=True)
    act, lin = nn.PReLU(), nn.Linear(H, 1)
    g = torch.randn(B, K)
    x = torch.randn(B, M, requires_grad=True)
    gx = torch.randn(B, M)
    flat, other = torch.randn(B * K * H), torch.randn(B * K * H)
    head = [P, Q, act.weight, lin.weight, lin.bias]

    def fb(f, out_grad, inputs):
        return lambda: torch.autograd.grad(f(), inputs, out_grad)
    return {
        "activation head: torch layers (PReLU, Linear)": fb(lambda: lin(act(P + Q.unsqueeze(1))).squeeze(-1), g, head),
        "activation head: ctr_ops.prelu_linear (torch twin)": fb(
            lambda: ctr_ops.prelu_linear(P + Q.unsqueeze(1), act.weight, lin.weight, lin.bias), g, head),
        "activation head: ctr_ops.attention_head (numba)": fb(
            lambda: ctr_ops.attention_head(P, Q, act.weight, lin.weight, lin.bias), g, head),
        "ReLU + Dropout(0.1): torch layers": fb(lambda: ctr_ops.relu_dropout_torch(x, 0.1, True), gx, [x]),
        "ReLU + Dropout(0.1): ctr_ops.relu_dropout (numba)": fb(lambda: ctr_ops.relu_dropout(x, 0.1, True), gx, [x]),
        f"one op on {B * K * H:,} floats: a * b": lambda: flat * other,
        f"one op on {B * K * H:,} floats: torch.where(a > 0, a, b)": lambda: torch.where(flat > 0, flat, other),
        f"one op on {B * K * H:,} floats: (a > 0).float()": lambda: (flat > 0).float(),
        f"one op on {B * K * H:,} floats: a.clamp(min=0)": lambda: flat.clamp(min=0),
        f"one op on {B * K * H:,} floats: bernoulli_(0.9)": lambda: torch.empty_like(flat).bernoulli_(0.9),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=4096, help="samples per call")
    p.add_argument("--threads", type=int, default=2, help="torch (and numba) CPU threads")
    p.add_argument("--calls", type=int, default=20, help="timed calls per row and round")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    ctr_ops.numba.set_num_threads(a.threads)
    rows = cases(a.batch)
    ms = {k: [] for k in rows}
    for _ in range(a.rounds):
        for k, f in rows.items():
            f()  # warm-up (and numba's compile on the first round)
            t = time.perf_counter()
            for _ in range(a.calls):
                f()
            ms[k].append((time.perf_counter() - t) / a.calls * 1e3)
    print(f"batch {a.batch}, {a.threads} threads, {a.rounds} rounds x {a.calls} calls, "
          f"forward + backward where a row has a gradient; ms per call, median [min, max]\n")
    print("| operation | ms |\n|---|---|")
    for k, v in ms.items():
        print(f"| {k} | {np.median(v):.3f} [{min(v):.3f}, {max(v):.3f}] |")


if __name__ == "__main__":
    main()
