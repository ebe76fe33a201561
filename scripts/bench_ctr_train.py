"""Benchmark of one DIN training step at ML-20M scale: what each speed change of train_ctr buys.

Side by side in one process, interleaved round by round (so that a noisy core slows every variant
alike), on the train split of a run folder made by `data_prep.py --dataset ml-20m` (e.g. the
2M-rating one that scripts/bench_data_path.py leaves in its work folder). Each variant trains a
fresh DIN (seed 0) for --steps timed steps after --warmup steps: batch gathering
(ctr_features), forward, loss with the embedding penalty, backward and Adam, as train_net does.
Variants:
  nn.Embedding     the lookups as torch's nn.Embedding (the code before the index_select change)
  index_select     ctr_models.Embedding (index_select lookups; the backward is an index_add)
  + batch B        a larger batch
  + bf16 autocast  the forward under torch.autocast(bfloat16); weights and Adam stay fp32
Prints samples/s per variant (median over rounds) and its ratio to the first row.

    python scripts/bench_ctr_train.py --run-dir /tmp/expctr-bench-data/run-2000000-new
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
import common  # noqa: E402
import ctr_features  # noqa: E402
import ctr_models  # noqa: E402
import train_ctr  # noqa: E402


def make_step(feats, cfg, batch, emb_class, bf16, emb_reg):
    """A fresh DIN and a closure running training step i (its batch: rows i*batch...)."""
    torch.manual_seed(0)
    net = ctr_models.build_net(cfg)
    for m in net.modules():  # the lookup implementation under test; same weights either way
        if isinstance(m, nn.Embedding):
            m.__class__ = emb_class
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    y = torch.from_numpy(feats.labels)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    net.train()

    def step(i):
        idx = perm[(i * batch) % (len(y) - batch):][:batch]
        b = feats.batch(idx.numpy())
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logit = net(b)
        loss = nn.functional.binary_cross_entropy_with_logits(logit.float(), y[idx])
        loss = loss + train_ctr.embedding_penalty(net, emb_reg)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return step


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", default="/tmp/expctr-bench-data/run-2000000-new",
                   help="a run folder with an ML-20M-shaped train split")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--batch", type=int, default=1024, help="the batch of the first rows")
    p.add_argument("--big-batch", type=int, default=4096, help="the batch of the '+ batch' rows")
    p.add_argument("--steps", type=int, default=30, help="timed steps per variant and round")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant and round")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    paths = common.RunPaths(a.run_dir)
    meta = common.read_json(paths.require(paths.meta, "python data_prep.py --dataset ml-20m"))
    train = train_ctr.load_split_arrays(paths, "train")
    vocab = ctr_features.build_vocab(train, common.load_items(paths), meta.get("user_fields", []))
    feats = ctr_features.Features(train, vocab)
    cfg = {"model": "din", "emb_dim": 16, "mlp": "128,64", "text_dim": 0,
           "dropout": train_ctr.MODEL_DEFAULTS["din"]["dropout"], **ctr_models.vocab_sizes(vocab)}
    emb_reg = train_ctr.MODEL_DEFAULTS["din"]["emb_reg"]
    B, BB = a.batch, a.big_batch
    variants = [(f"nn.Embedding, batch {B}", B, nn.Embedding, False),
                (f"index_select, batch {B}", B, ctr_models.Embedding, False),
                (f"index_select, batch {B}, bf16 autocast", B, ctr_models.Embedding, True),
                (f"index_select, batch {BB}", BB, ctr_models.Embedding, False),
                (f"index_select, batch {BB}, bf16 autocast", BB, ctr_models.Embedding, True)]
    steps = {name: make_step(feats, cfg, b, e, bf, emb_reg) for name, b, e, bf in variants}
    speed = {name: [] for name, *_ in variants}
    for r in range(a.rounds):
        for name, batch, *_ in variants:
            for i in range(a.warmup):
                steps[name](r * (a.warmup + a.steps) + i)
            t = time.perf_counter()
            for i in range(a.steps):
                steps[name](r * (a.warmup + a.steps) + a.warmup + i)
            speed[name].append(a.steps * batch / (time.perf_counter() - t))
        print(f"round {r + 1}/{a.rounds}: " + ", ".join(f"{v[-1]:,.0f}" for v in speed.values()),
              flush=True)
    print(f"\n{len(feats):,} train samples, {a.threads} threads, {a.rounds} rounds x {a.steps} "
          f"steps, samples/s median [min, max]\n")
    print("| variant | samples/s | vs first row |\n|---|---|---|")
    base = float(np.median(speed[variants[0][0]]))
    for name, v in speed.items():
        m = float(np.median(v))
        print(f"| {name} | {m:,.0f} [{min(v):,.0f}, {max(v):,.0f}] | {m / base:.2f}x |")


if __name__ == "__main__":
    main()
