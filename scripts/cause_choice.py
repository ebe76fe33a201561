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
from report import cause_choice_md  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", required=True, help="run folder of a synthetic world")
    p.add_argument("--split", default="valid", help="split whose explanations both tags have")
    p.add_argument("--base", default="base", help="explainer tag of the untuned model")
    p.add_argument("--aligned", required=True, help="explainer tag of the aligned policy, e.g. iter_8")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-title-chars", type=int, default=eq.MIN_TITLE_CHARS, help="as evaluate.py's")
    p.add_argument("--min-ground-chars", type=int, default=eq.MIN_GROUND_CHARS, help="as evaluate.py's")
    a = p.parse_args(argv)
    paths = common.RunPaths(a.run_dir)
    items, samples = common.load_items(paths), common.load_split(paths, a.split)
    texts = {k: {i: e["explanation"] for i, e in
                 enumerate(common.load_explanations(paths, tag, a.split, samples))}
             for k, tag in (("base", a.base), ("aligned", a.aligned))}
    cc = eq.cause_choice(samples, items, texts, a)
    if not cc:
        raise common.ExpCTRError(f"{paths.split(a.split)}: no sample with a cause and >= 2 target genres")
    print(f"cause choice on {a.split}, {cc['n']} targets with >= 2 genres ({paths.root}; "
          f"base = {a.base}, aligned = {a.aligned})\n")
    print("\n".join(cause_choice_md(cc)))
    return cc


if __name__ == "__main__":
    main()
