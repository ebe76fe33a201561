"""Cause choice of two explainers on one split (synthetic worlds): evaluate.py's rule, any split.

evaluate.py reports the cause choice (issue 9, target 5) on test. Settings are chosen on valid, so
this script gives the same table for the greedy explanations of any split that both tags have
under R/explanations/<tag>/<split>.jsonl: on targets with >= 2 genres, hit = names the planted
cause and no other genre of the target; wrong = names a target genre that is not the cause; the
two prompt-echo rows and the paired bootstrap differences are explanation_quality.cause_choice's.

    python scripts/cause_choice.py --run-dir runs/planted12 --split valid --aligned iter_8
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
import explanation_quality as eq  # noqa: E402


def texts_of(R: Path, tag: str, split: str, samples: list[dict]) -> dict[int, str]:
    """The tag's explanations of the split, by sample index; refuses a file of other samples."""
    path = R / "explanations" / tag / f"{split}.jsonl"
    rows = common.read_jsonl(path)
    if [(r["uid"], r["iid"]) for r in rows] != [(s["uid"], s["iid"]) for s in samples]:
        raise common.ExpCTRError(f"{path}: its (uid, iid) rows are not those of data/{split}.jsonl")
    return {i: r["explanation"] for i, r in enumerate(rows)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", required=True, help="run folder of a synthetic world")
    p.add_argument("--split", default="valid", help="split whose explanations both tags have")
    p.add_argument("--base", default="base", help="explainer tag of the untuned model")
    p.add_argument("--aligned", required=True, help="explainer tag of the aligned policy, e.g. iter_8")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-title-chars", type=int, default=8, help="as evaluate.py's")
    p.add_argument("--min-ground-chars", type=int, default=4, help="as evaluate.py's")
    a = p.parse_args(argv)
    R = Path(a.run_dir)
    items = {r["iid"]: r for r in common.read_jsonl(R / "data" / "items.jsonl")}
    samples = common.read_jsonl(R / "data" / f"{a.split}.jsonl")
    texts = {"base": texts_of(R, a.base, a.split, samples), "aligned": texts_of(R, a.aligned, a.split, samples)}
    cc = eq.cause_choice(samples, items, texts, a)
    if not cc:
        raise common.ExpCTRError(f"{R}/data/{a.split}.jsonl: no sample with a cause and >= 2 target genres")
    print(f"cause choice on {a.split}, {cc['n']} targets with >= 2 genres ({R}; base = {a.base}, "
          f"aligned = {a.aligned})\n\n| explanations | cause hit [95% CI] | names a wrong genre |\n|---|---|---|")
    for k in ("base", "aligned", "echo_all_genres", "echo_first_genre"):
        lo, hi = cc[k]["cause_hit_ci"]
        print(f"| {k} | {cc[k]['cause_hit']:.4f} [{lo:.4f}, {hi:.4f}] | {cc[k]['wrong_genre']:.4f} |")
    for k in (k for k in cc if k.startswith("aligned_minus_")):
        d, (lo, hi) = cc[k]["delta"], cc[k]["ci"]
        print(f"- {k}: Δ {d:+.4f} [{lo:+.4f}, {hi:+.4f}], p = {cc[k]['p_value']:.4f} (paired bootstrap, one-sided)")
    return cc


if __name__ == "__main__":
    main()
