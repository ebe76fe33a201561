"""Benchmark of ctr_ops.py's kernels against the torch layers they replace, at DIN's shapes.

Side by side in one process, interleaved round by round (a noisy core slows every row alike),
forward + backward of each operation on random inputs at batch --batch (history length 10,
embedding size 16, activation-unit width 36, MLP width 128, 1.8 x batch distinct items of up to
3 genres), and a few single torch ops on the same 1.5M-float tensor, which show why the kernels
avoid bool tensors and dropout's bernoulli_. Prints ms per call (median over rounds). Not a
test: nothing here checks a speed.

    python scripts/bench_ctr_ops.py --threads 2
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ctr_ops  # noqa: E402


def cases(B: int, K: int = 10, d: int = 16, H: int = 36, M: int = 128, G: int = 10) -> dict:
    torch.manual_seed(0)
    U = B * 18 // 10  # distinct items of a batch (~7,500 at 4,096 on the 2M-rating bench data)
    lab = torch.randint(0, 3, (B, K))
    din = [torch.randn(U, d, requires_grad=True), torch.randint(0, U, (B, K)),
           torch.stack([lab == 1, lab == 2], -1).float(), torch.randn(B, d, requires_grad=True),
           torch.randn(B, H, requires_grad=True), torch.randn(H, 2 * d + 2, requires_grad=True),
           torch.tensor([0.25], requires_grad=True), torch.randn(1, H, requires_grad=True),
           torch.zeros(1, requires_grad=True)]
    gdin = [torch.randn(B, d), torch.randn(B, 2)]
    table, gidx = torch.randn(20, d, requires_grad=True), torch.randint(0, 20, (U, G))
    gidx[:, 3:] = 0  # up to 3 genres per item
    gg = torch.randn(U, d)
    x = torch.randn(B, M, requires_grad=True)
    gx = torch.randn(B, M)
    flat, other = torch.randn(B * K * H), torch.randn(B * K * H)

    def fb(f, out_grad, inputs):
        inputs = [t for t in inputs if t.requires_grad]
        return lambda: torch.autograd.grad(f(), inputs, out_grad)
    one = f"one op on {B * K * H:,} floats:"
    return {
        "DIN unit + pooling: torch layers (din_attention_torch)":
            fb(lambda: ctr_ops.din_attention_torch(*din), gdin, din),
        "DIN unit + pooling: ctr_ops.din_attention (numba + MKL)":
            fb(lambda: ctr_ops.din_attention(*din), gdin, din),
        "genre mean: torch ops (bag_mean_torch)": fb(lambda: ctr_ops.bag_mean_torch(table, gidx), gg, [table]),
        "genre mean: ctr_ops.bag_mean (numba)": fb(lambda: ctr_ops.bag_mean(table, gidx), gg, [table]),
        "ReLU + Dropout(0.1): torch layers": fb(lambda: ctr_ops.relu_dropout_torch(x, 0.1, True), gx, [x]),
        "ReLU + Dropout(0.1): ctr_ops.relu_dropout (numba)":
            fb(lambda: ctr_ops.relu_dropout(x, 0.1, True), gx, [x]),
        f"{one} a * b": lambda: flat * other,
        f"{one} torch.where(a > 0, a, b)": lambda: torch.where(flat > 0, flat, other),
        f"{one} (a > 0).float()": lambda: (flat > 0).float(),
        f"{one} a.clamp(min=0)": lambda: flat.clamp(min=0),
        f"{one} bernoulli_(0.9)": lambda: torch.empty_like(flat).bernoulli_(0.9),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=4096, help="samples per call")
    p.add_argument("--threads", type=int, default=2, help="torch (and numba) CPU threads")
    p.add_argument("--calls", type=int, default=20, help="timed calls per row and round")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
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
