"""Benchmark of one DIN training step at ML-20M scale: what each speed change of train_ctr buys.

Side by side in one process, interleaved round by round (so that a noisy core slows every variant
alike), on the train split of a run folder made by `data_prep.py --dataset ml-20m` (e.g. the
2M-rating one that scripts/bench_data_path.py leaves in its work folder). Each variant trains a
fresh DIN (seed 0) for --steps timed steps after --warmup steps: batch gathering
(ctr_features; each variant its commit's, from LAST on), forward, loss, backward and Adam, as
train_net does. Variants:
  before (BEFORE)  ctr_models.py of commit BEFORE (read from git), as that commit's train_net
                   ran it: Adam (for-each), the embedding L2 added to the loss each step
  previous (PREVIOUS)  ctr_models.py and ctr_ops.py of commit PREVIOUS (numba head only), with
                   today's optimizer (as that commit's train_net ran it)
  last (LAST)      ctr_models.py, ctr_ops.py and ctr_features.py of commit LAST (the fused unit
                   with its matrix product over [k, q*k, sign]; torch's index_select backward;
                   batches gathered by numpy indexing)
  now              ctr_models.py / ctr_ops.py and train_ctr.make_optimizer of the working tree
                   (fused Adam; the L2 as the embedding tables' weight decay)
  + batch B        a larger batch
  + bf16 autocast  the forward under torch.autocast(bfloat16); weights and Adam stay fp32
  + bf16 tower     train_ctr --tower-dtype bfloat16: only the MLP tower's products in bf16
Prints samples/s per variant (median over rounds), its ratio to the first row, and its ratio to
the LAST commit's row and to today's step at --big-batch round by round (median [min, max] of the
per-round ratios: the host's speed drifts between rounds, a ratio within one round much less).
--profile N instead profiles N steps of the working tree's step (torch.profiler, CPU): the share
of the step in each phase (batch gathering, forward, backward, Adam) and in matrix products (mm,
addmm, bmm), and the bound that gives: with every other operation free, a step could be at most
1 / (matrix-product share) times faster at these settings; then N more steps without the
profiler, each numba kernel's ms per step (the profiler sees them only inside their autograd
functions).

    python scripts/bench_ctr_train.py --run-dir /tmp/expctr-bench-data/run-2000000-new
    python scripts/bench_ctr_train.py --run-dir /tmp/expctr-bench-data/run-2000000-new --profile 40
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import ctr_features  # noqa: E402
import ctr_models  # noqa: E402
import train_ctr  # noqa: E402


BEFORE = "c2c6f4a"  # the last commit before ctr_ops.py (fused attention head, float masks)
PREVIOUS = "509ac5a"  # ctr_ops.py's numba PReLU + Linear head, before the fused unit + pooling
LAST = "b7a5fff"  # the fused unit + pooling, before the item part per distinct item and the numba
#                   lookup backward and batch gathering


def models_at(commit: str, own_features: bool = False):
    """ctr_models.py of `commit`, imported as its own module, with that commit's ctr_ops.py where
    it had one; with own_features also its ctr_features.py (else it reads today's). -> the
    ctr_models module; its features module is its .ctr_features."""
    import importlib.util
    import tempfile
    folder = Path(tempfile.mkdtemp())

    def load(name):
        src = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:{name}.py"],
                             capture_output=True, text=True)
        if src.returncode:
            return None
        (folder / f"{name}_{commit}.py").write_text(src.stdout)
        spec = importlib.util.spec_from_file_location(f"{name}_{commit}", folder / f"{name}_{commit}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    ops, now = load("ctr_ops"), sys.modules["ctr_ops"]
    feats_now = sys.modules["ctr_features"]
    sys.modules["ctr_ops"] = ops or now  # what its `from ctr_ops import ...` reads
    try:
        if own_features:
            sys.modules["ctr_features"] = load("ctr_features")
        models = load("ctr_models")
    finally:
        sys.modules["ctr_ops"], sys.modules["ctr_features"] = now, feats_now
    if models is None:
        sys.exit(f"bench_ctr_train.py: cannot read ctr_models.py of commit {commit} (a shallow clone?)")
    return models


def make_step(feats, cfg, batch, models, bf16, emb_reg, loss_l2=False):
    """A fresh DIN of `models` (a ctr_models module) and a closure running training step i (its
    batch: rows i*batch...). loss_l2: as commit BEFORE's train_net ran it (plain Adam, the
    embedding L2 term added to the loss), else train_ctr.make_optimizer's fused Adam with the L2
    as the tables' weight decay."""
    torch.manual_seed(0)
    if bf16 == "tower":  # --tower-dtype bfloat16 (no autocast)
        cfg, bf16 = {**cfg, "tower_dtype": "bfloat16"}, False
    net = models.build_net(cfg)
    if loss_l2:  # that commit's train_net: plain Adam, the L2 term in the loss
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    else:
        opt = train_ctr.make_optimizer(net, argparse.Namespace(lr=3e-3, weight_decay=0.0,
                                                               emb_reg=emb_reg))
    y = torch.from_numpy(feats.labels)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    net.train()

    def step(i):
        rf = torch.profiler.record_function  # phase labels for --profile (no cost otherwise)
        with rf("phase: batch gathering"):
            idx = perm[(i * batch) % (len(y) - batch):][:batch]
            b = feats.batch(idx.numpy())
        with rf("phase: forward and loss"):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logit = net(b)
            loss = nn.functional.binary_cross_entropy_with_logits(logit.float(), y[idx])
            if loss_l2:
                loss = loss + train_ctr.embedding_penalty(net, emb_reg)
        with rf("phase: backward"):
            opt.zero_grad()
            loss.backward()
        with rf("phase: Adam"):
            opt.step()
    return step


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def profile(step, n: int, warmup: int, batch: int) -> None:
    """Time shares of n profiled steps: per phase, and of the matrix products (self time)."""
    from torch.profiler import ProfilerActivity
    for i in range(warmup):
        step(i)
    t = time.perf_counter()
    with torch.profiler.profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(n):
            step(warmup + i)
    wall = time.perf_counter() - t
    ev = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ev) or 1.0  # time inside ops, in us
    phases = {e.key: e.cpu_time_total for e in ev if e.key.startswith("phase: ")}
    mm = sum(e.self_cpu_time_total for e in ev if e.key in MATMUL_OPS)
    print(f"{n} profiled steps of batch {batch}: {wall / n * 1e3:.1f} ms/step under the profiler "
          f"({n * batch / wall:,.0f} samples/s)\n")
    print("| part | share of the step |\n|---|---|")
    for k, v in phases.items():
        print(f"| {k[7:]} | {v / total:.1%} |")
    print(f"| matrix products ({', '.join(MATMUL_OPS)}), self time | {mm / total:.2%} |")
    print(f"\nwith every other operation free, a step would be at most {total / max(mm, 1):.1f}x faster")
    top = sorted(ev, key=lambda e: -e.self_cpu_time_total)[:12]
    print("\n| op (top 12 by self time) | share |\n|---|---|")
    for e in top:
        print(f"| {e.key} | {e.self_cpu_time_total / total:.1%} |")
    kernel_times(step, n, warmup + n, batch)


def kernel_times(step, n: int, first: int, batch: int) -> None:
    """ms per step in each numba kernel of ctr_ops and ctr_features (the profiler sees them only
    inside their autograd function), over n more steps without the profiler, each kernel call
    timed by a wrapper."""
    import numba
    spent, wrapped = {}, []
    for mod in (sys.modules["ctr_ops"], sys.modules["ctr_features"]):
        for name, f in list(vars(mod).items()):
            if isinstance(f, numba.core.registry.CPUDispatcher) and not f.targetoptions.get("inline"):
                def timed(*a, _f=f, _k=f"{mod.__name__}.{name}"):
                    t = time.perf_counter()
                    r = _f(*a)
                    spent[_k] = spent.get(_k, 0.0) + time.perf_counter() - t
                    return r
                wrapped.append((mod, name, f))
                setattr(mod, name, timed)
    try:
        t = time.perf_counter()
        for i in range(n):
            step(first + i)
        wall = time.perf_counter() - t
    finally:
        for mod, name, f in wrapped:
            setattr(mod, name, f)
    print(f"\n{n} more steps without the profiler: {wall / n * 1e3:.2f} ms/step "
          f"({n * batch / wall:,.0f} samples/s), of which in numba kernels "
          f"{sum(spent.values()) / n * 1e3:.2f} ms\n\n| numba kernel | ms per step |\n|---|---|")
    for k, v in sorted(spent.items(), key=lambda kv: -kv[1]):
        print(f"| {k} | {v / n * 1e3:.3f} |")


def time_gathering(feats: dict, batch: int, rounds: int, calls: int) -> None:
    """ms per Features.batch call of each gatherer on the same shuffled batches, interleaved."""
    perm = np.random.default_rng(0).permutation(len(next(iter(feats.values()))))
    ms = {k: [] for k in feats}
    for r in range(rounds):
        for k, f in feats.items():
            f.batch(perm[:batch])  # warm-up (numba's compile on the first round)
            t = time.perf_counter()
            for i in range(calls):
                f.batch(perm[(r * calls + i) * batch % (len(perm) - batch):][:batch])
            ms[k].append((time.perf_counter() - t) / calls * 1e3)
    print(f"batch gathering, batch {batch}, {rounds} rounds x {calls} calls, ms per batch, "
          f"median [min, max]\n\n| gatherer | ms |\n|---|---|")
    for k, v in ms.items():
        print(f"| {k} | {np.median(v):.3f} [{min(v):.3f}, {max(v):.3f}] |")


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
    p.add_argument("--gather", action="store_true",
                   help="instead: time batch gathering alone, LAST's numpy indexing against today's "
                        "numba kernel (batch --big-batch, interleaved rounds)")
    p.add_argument("--profile", type=int, default=0,
                   help="profile this many steps of the working tree's step (batch --batch) instead of timing variants")
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
    if a.profile:
        return profile(make_step(feats, cfg, B, ctr_models, False, emb_reg), a.profile, a.warmup, B)
    old, prev, last = models_at(BEFORE), models_at(PREVIOUS), models_at(LAST, own_features=True)
    last_feats = last.ctr_features.Features(train, vocab)  # LAST's batch gathering (numpy)
    if a.gather:
        return time_gathering({f"numpy indexing ({LAST})": last_feats, "numba (now)": feats},
                              BB, a.rounds, a.steps)
    variants = [(f"before ({BEFORE}), batch {B}", B, old, False, True),
                (f"before ({BEFORE}), batch {BB}", BB, old, False, True),
                (f"previous ({PREVIOUS}), batch {BB}", BB, prev, False, False),
                (f"last ({LAST}), batch {BB}", BB, last, False, False),
                (f"now, batch {B}", B, ctr_models, False, False),
                (f"now, batch {BB}", BB, ctr_models, False, False),
                (f"now, batch {BB}, bf16 autocast", BB, ctr_models, True, False),
                (f"now, batch {BB}, --tower-dtype bfloat16", BB, ctr_models, "tower", False)]
    steps = {name: make_step(last_feats if m is last else feats, cfg, b, m, bf, emb_reg, l2)
             for name, b, m, bf, l2 in variants}
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
    print("| variant | samples/s | vs first row | vs the last commit's row, paired by round | "
          f"vs now at batch {BB}, paired by round |")
    print("|---|---|---|---|---|")
    base = float(np.median(speed[variants[0][0]]))

    def paired(v, ref):  # each round's ratio, so the host's drift between rounds cancels
        r = [x / y for x, y in zip(v, ref)]
        return f"{np.median(r):.3f}x [{min(r):.3f}x, {max(r):.3f}x]"
    last, now = speed[variants[3][0]], speed[variants[5][0]]
    for name, v in speed.items():
        m = float(np.median(v))
        print(f"| {name} | {m:,.0f} [{min(v):,.0f}, {max(v):,.0f}] | {m / base:.2f}x | "
              f"{paired(v, last)} | {paired(v, now)} |")


if __name__ == "__main__":
    main()
