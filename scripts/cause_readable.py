"""How well can the explainer's prompt tell the cause? Rules on its counts vs the echo (issue 9).

Target 5 asks aligned explanations to name the planted cause alone more often than the prompt
echo that restates the target's first genre (explanation_quality.cause_choice: hit = names the
cause and no other genre of a >= 2-genre target). scripts/cause_information.py measures what the
true tastes carry; this measures what the explainer can *see*: its prompt (style "genres") shows
the liked and disliked history as genre counts, so an explainer that names one target genre can
at best apply a rule to those counts. On the run's own samples, with no model, the cause hit of

  echo_first_genre  the target's first listed genre (the baseline target 5 must beat),
  most_seen         the target genre with the most history items (liked + disliked),
  net               the target genre with the largest |liked - disliked| count,
  learned           a logistic regression on the two genres' liked / disliked counts (and
                    their net and total differences), fitted on train's 2-genre targets,

and each rule minus the echo, paired bootstrap 95% CI on the same resampled targets. A tie goes
to the first genre (the echo's pick). The learned row on train is in-sample. These rules are what
a reader of the counts can reach, not a bound on it (the best of them was seen on valid). The
test split is refused: settings are chosen on valid.

    python scripts/cause_readable.py --run-dir runs/planted12 --split valid,rl,train
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
import explanation_quality as eq  # noqa: E402
from common import ExpCTRError  # noqa: E402


def pair_counts(sample: dict, items: dict) -> tuple[list[str], list[list[int]]]:
    """The target's genres and, per genre, [liked, disliked] history counts (the prompt's:
    common.genre_profile, which skips history items the catalogue does not know)."""
    liked, disliked = common.split_history(sample)
    genres = lambda i: (items.get(i) or {}).get("genres", [])
    cl = Counter(g for i in liked for g in genres(i))
    cd = Counter(g for i in disliked for g in genres(i))
    gs = genres(sample["iid"])
    return gs, [[cl[g], cd[g]] for g in gs]


def features(c: list[list[int]]) -> list[float]:
    (la, da), (lb, db) = c
    return [la, da, lb, db, abs(la - da) - abs(lb - db), (la + da) - (lb + db)]


def choices(rows: list[dict], items: dict, clf) -> dict[str, np.ndarray]:
    """Per 2-genre target: 1.0 where the rule picks the cause."""
    out = {k: [] for k in ("echo_first_genre", "most_seen", "net", "learned")}
    for s in rows:
        gs, c = pair_counts(s, items)
        picks = {"echo_first_genre": 0,
                 "most_seen": int(np.argmax([a + b for a, b in c])),
                 "net": int(np.argmax([abs(a - b) for a, b in c])),
                 "learned": 0 if clf.predict([features(c)])[0] else 1}
        for k, j in picks.items():
            out[k].append(float(gs[j] == s["cause"]))
    return {k: np.array(v) for k, v in out.items()}


def two_genre(paths, items, split) -> list[dict]:
    samples = common.load_split(paths, split)
    rows = [samples[i] for i in eq.choice_targets(samples, items)]
    if any(len(items[s["iid"]]["genres"]) > 2 for s in rows):
        raise ExpCTRError(f"{paths.root} {split}: a target with > 2 genres; this script "
                          "compares two (the synthetic world's items have 1-2)")
    return rows


def main(argv=None) -> dict:
    from sklearn.linear_model import LogisticRegression
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", required=True, help="run folder of a synthetic world (data_prep.py)")
    p.add_argument("--split", default="valid,rl,train", help="splits to measure (not test)")
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    splits = [s for s in a.split.split(",") if s]
    if "test" in splits:
        raise ExpCTRError("--split test: refused; choose a world on valid (evaluate.py reports test)")
    paths = common.RunPaths(a.run_dir)
    items = common.load_items(paths)
    train = two_genre(paths, items, "train")
    if not train:
        raise ExpCTRError(f"{paths.root}: no train sample with a cause and 2 target genres "
                          "(a synthetic world's run folder expected)")
    y = [s["cause"] == items[s["iid"]]["genres"][0] for s in train]  # 1 = the first genre
    if len(set(y)) < 2:
        raise ExpCTRError(f"{paths.root} train: the cause is always the {'first' if y[0] else 'second'}"
                          " genre; the learned rule needs both")
    clf = LogisticRegression(max_iter=2000).fit(
        [features(pair_counts(s, items)[1]) for s in train], y)
    rng = np.random.default_rng(a.seed)
    res = {}
    print(f"cause hit of rules on the prompt's genre counts, 2-genre targets ({paths.root})\n")
    print("| split | n | rule | cause hit | minus echo_first_genre [95% CI] |\n|---|---|---|---|---|")
    for split in splits:
        rows = train if split == "train" else two_genre(paths, items, split)
        if not rows:
            continue
        h = choices(rows, items, clf)
        B = rng.integers(0, len(rows), (a.n_boot, len(rows)))
        res[split] = {"n": len(rows)}
        for k, v in h.items():
            d = (v - h["echo_first_genre"])[B].mean(1)
            ci = [float(x) for x in np.percentile(d, [2.5, 97.5])]
            r = res[split][k] = {"cause_hit": float(v.mean()),
                                 "minus_echo": float(v.mean() - h["echo_first_genre"].mean()), "ci": ci}
            diff = "" if k == "echo_first_genre" else \
                f"{r['minus_echo']:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]"
            note = " (in-sample)" if split == "train" and k == "learned" else ""
            print(f"| {split} | {len(rows)} | {k}{note} | {v.mean():.3f} | {diff} |")
    return res


if __name__ == "__main__":
    common.cli(main)
