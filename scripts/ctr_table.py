"""The ID-CTR table over seeds: each model (x a small settings grid) trained with several seeds,
reported as mean +- std of valid and test AUC / LogLoss; the setting of each model is chosen on
valid AUC only (test is printed for the chosen row, and for the grid only as information).

    python scripts/ctr_table.py --run-dir runs/ml100k-ctr --models popularity,logreg,deepfm,dcnv2,din \
        --seeds 0,1,2 --grid 'emb-reg=0,0.001;dropout=0.1,0.2'

Trains with train_ctr.py into <run-dir>/ctr/<model>__<setting>__s<seed> (kept, so a rerun
reuses them); writes <run-dir>/ctr_table.json and prints Markdown.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ctr_models  # noqa: E402
import train_ctr  # noqa: E402

GRID_MODELS = ctr_models.TORCH_MODELS  # popularity and logreg have no grid


def settings(grid: str) -> list[dict]:
    axes = [(k.strip(), v.split(",")) for k, v in (a.split("=") for a in grid.split(";") if a)]
    return [dict(zip([k for k, _ in axes], vals)) for vals in itertools.product(*[v for _, v in axes])]


def tag(cfg: dict) -> str:
    return "_".join(f"{k}{v}" for k, v in cfg.items()) or "default"


def fmt(xs) -> str:
    return f"{np.mean(xs):.4f} ± {np.std(xs, ddof=1) if len(xs) > 1 else 0:.4f}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", required=True)
    p.add_argument("--models", default="popularity,logreg,deepfm,dcnv2,din")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--grid", default="", help="'flag=v1,v2;flag2=...' of train_ctr.py flags")
    p.add_argument("--extra", default="", help="more train_ctr.py flags for every run")
    a = p.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    out = {}
    for model in a.models.split(","):
        grid = settings(a.grid) if model in GRID_MODELS else [{}]
        rows = []
        for cfg in grid:
            res = {"valid_auc": [], "test_auc": [], "valid_logloss": [], "test_logloss": []}
            for seed in seeds:
                name = f"{model}__{tag(cfg)}__s{seed}"
                flags = [x for k, v in cfg.items() for x in (f"--{k}", v)]
                train_ctr.main(["--run-dir", a.run_dir, "--model", model, "--out-name", name,
                                "--seed", str(seed), *flags, *a.extra.split()])
                m = json.loads((Path(a.run_dir) / "ctr" / name / "metrics.json").read_text())
                for s in ("valid", "test"):
                    res[f"{s}_auc"].append(m[s]["auc"])
                    res[f"{s}_logloss"].append(m[s]["logloss"])
            rows.append({"setting": cfg, **res})
        best = max(rows, key=lambda r: np.mean(r["valid_auc"]))  # chosen on valid only
        out[model] = {"chosen": best, "grid": rows}
    Path(a.run_dir, "ctr_table.json").write_text(json.dumps(out, indent=1))
    print(f"\nseeds {seeds}; setting chosen per model on mean valid AUC\n")
    print("| model | setting | valid AUC | valid LogLoss | test AUC | test LogLoss |")
    print("|---|---|---|---|---|---|")
    for model, d in out.items():
        r = d["chosen"]
        print(f"| {model} | {tag(r['setting'])} | {fmt(r['valid_auc'])} | {fmt(r['valid_logloss'])} "
              f"| {fmt(r['test_auc'])} | {fmt(r['test_logloss'])} |")
    print("\nThe grid (valid AUC mean ± std; test only for information):\n")
    print("| model | setting | valid AUC | valid LogLoss | test AUC |")
    print("|---|---|---|---|---|")
    for model, d in out.items():
        for r in d["grid"]:
            print(f"| {model} | {tag(r['setting'])} | {fmt(r['valid_auc'])} | "
                  f"{fmt(r['valid_logloss'])} | {fmt(r['test_auc'])} |")


if __name__ == "__main__":
    main()
