"""Benchmark of the data path at ML-20M scale: today's columnar path vs the per-row JSONL path.

Side by side in one run, on ML-20M-shaped files from scripts/gen_ml20m.py (seeded; real data is
never committed): `data_prep.py --dataset ml-20m` and `train_ctr.py --model din --epochs 3` of
the previous per-row code (git commit LEGACY, checked out into the work folder) and of the
working tree, at --old-at ratings; the working tree alone at each --sizes. Each step is its own
process; reported: wall seconds, peak RSS (wait4), and for train_ctr the data-loading seconds
(process start to the first training batch) and the training loop's samples/s (timed around
the epoch loop's progress bar, the same way for both codes; the median over --epochs epochs).
Prints a Markdown table.

    python scripts/bench_data_path.py --sizes 2000000,20000000 --old-at 2000000
    python scripts/bench_data_path.py --sizes 2000000 --new "--batch-size 1024;--batch-size 4096"
    python scripts/bench_data_path.py --sizes 2000000,20000000 --repeats 3 \
        --new "--batch-size 4096;--batch-size 4096 --tower-dtype bfloat16"

With --repeats N the old code and the new variants run N times at --old-at, alternating, and
each new variant's training speed is also given as a ratio to the per-row code's run of the same
repeat (minutes apart instead of the whole benchmark apart: the host's speed drifts).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LEGACY = "a97192e"  # the last commit with the per-row JSONL data path


def child(code_dir: str, script: str, argv: list[str]):
    """Run one stage's main() from code_dir, timing the epoch loop (train_ctr) from inside."""
    sys.path.insert(0, code_dir)
    os.chdir(code_dir)
    t0 = time.time()
    mod = __import__(script)
    marks = {}
    if script == "train_ctr":
        real = mod.tqdm

        class Timed:  # wraps the progress bar of the epoch loop only
            def __init__(self, it, *a, desc="", **k):
                self.it, self.epoch = real(it, *a, desc=desc, **k), " epoch " in desc

            def __iter__(self):
                if self.epoch:
                    marks.setdefault("first_batch", time.time())
                    t = time.time()
                yield from self.it
                if self.epoch:
                    marks.setdefault("epoch_s", []).append(time.time() - t)

            def __getattr__(self, name):
                return getattr(self.it, name)

        mod.tqdm = Timed
    mod.main(argv)
    marks["load_s"] = marks.get("first_batch", time.time()) - t0
    print("BENCH " + json.dumps(marks))


def run(cmd: list[str]) -> dict:
    t = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, TQDM_DISABLE="1"))
    out = proc.stdout.read()
    _, status, ru = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed (status {status}):\n{out[-2000:]}")
    res = {"wall_s": time.time() - t, "rss_gb": ru.ru_maxrss / 2 ** 20}
    for line in out.splitlines():
        if line.startswith("BENCH "):
            res.update(json.loads(line[6:]))
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="2000000,20000000", help="ratings per generated file")
    p.add_argument("--old-at", type=int, default=2_000_000, help="size at which the old code runs too")
    p.add_argument("--work", default="/tmp/expctr-bench-data", help="scratch folder (tens of GB at 20M)")
    p.add_argument("--threads", type=int, default=2, help="train_ctr --threads")
    p.add_argument("--new", default="",
                   help="';'-separated train_ctr flags, one run of the working tree each (default: "
                        "one run with its defaults); the old code runs with its defaults (batch 1,024)")
    p.add_argument("--epochs", type=int, default=3,
                   help="train_ctr --epochs: 'train samples/s' is the median epoch's (the first "
                        "also loads numba's cached kernels, ~0.8 s, in its first step)")
    p.add_argument("--repeats", type=int, default=1,
                   help="at --old-at, run the old code and the new variants this many times, alternating")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    old = work / f"code-{LEGACY}"
    if not old.exists():
        old.mkdir()
        subprocess.run(f"git -C {ROOT} archive {LEGACY} | tar -x -C {old}", shell=True, check=True)
    py, me, rows = sys.executable, str(Path(__file__).resolve()), []
    for n in [int(x) for x in a.sizes.split(",")]:
        raw = work / f"raw-{n}"
        if not (raw / "ratings.csv").exists():
            # its own process: generated in this one, the files' memory would be counted in the
            # peak RSS of every step forked after it (a forked child starts with its parent's RSS)
            subprocess.run([py, str(ROOT / "scripts" / "gen_ml20m.py"), "--ratings", str(n),
                            "--out", str(raw), "--seed", str(a.seed)], check=True)
        new = [("columnar (new)" + (f", {f.strip()}" if f.strip() else ""), ROOT, f.split())
               for f in a.new.split(";")]
        codes = ([("per-row (old)", old, [])] + new) * a.repeats if n == a.old_at else new
        for name, code, flags in codes:
            run_dir = work / f"run-{n}-{'old' if code == old else 'new'}"
            subprocess.run(["rm", "-rf", str(run_dir)], check=True)
            dp = run([py, me, "--child", str(code), "data_prep", "--run-dir", str(run_dir),
                      "--dataset", "ml-20m", "--raw-dir", str(raw)])
            meta = json.loads((run_dir / "data" / "meta.json").read_text())
            tr = run([py, me, "--child", str(code), "train_ctr", "--run-dir", str(run_dir),
                      "--model", "din", "--epochs", str(a.epochs), "--threads", str(a.threads),
                      *flags])
            m = json.loads((run_dir / "ctr" / "din" / "metrics.json").read_text())
            n_train = meta["counts"]["train"]
            sps = [n_train / s for s in tr["epoch_s"]]  # each epoch's loop
            rows.append((n, name, meta["n_interactions"], n_train, dp, tr,
                         float(np.median(sps)), m["valid"]["auc"]))
            print(f"{n:,} {name}: data_prep {dp['wall_s']:.0f}s {dp['rss_gb']:.2f}GB, "
                  f"train_ctr {tr['wall_s']:.0f}s (load {tr['load_s']:.0f}s, samples/s per epoch "
                  f"{', '.join(f'{x:,.0f}' for x in sps)}) {tr['rss_gb']:.2f}GB", flush=True)
    print(f"\n| ratings | path | data_prep s | data_prep peak RSS GB | train_ctr DIN {a.epochs} "
          "epoch(s): wall s | load s | train samples/s (median epoch) | peak RSS GB | train samples | "
          "valid AUC |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n, name, n_int, n_train, dp, tr, sps, auc in rows:
        print(f"| {n_int:,} | {name} | {dp['wall_s']:.0f} | {dp['rss_gb']:.2f} | {tr['wall_s']:.0f} "
              f"| {tr['load_s']:.0f} | {sps:,.0f} | {tr['rss_gb']:.2f} | {n_train:,} | {auc:.4f} |")
    ratios = {}  # new variant -> its speed / the per-row code's, in each repeat
    base = None
    for n, name, *_, sps, _auc in rows:
        if n != a.old_at:
            continue
        if name == "per-row (old)":
            base = sps
        else:
            ratios.setdefault(name, []).append(sps / base)
    if ratios:
        print(f"\ntraining samples/s at {a.old_at:,} ratings as a ratio to the per-row code's run of "
              f"the same repeat ({a.repeats} repeat(s)): median [min, max]\n")
        print("| path | ratio |\n|---|---|")
        for name, v in ratios.items():
            print(f"| {name} | {np.median(v):.2f}x [{min(v):.2f}x, {max(v):.2f}x] |")


if __name__ == "__main__":
    if len(sys.argv) > 3 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        main()
