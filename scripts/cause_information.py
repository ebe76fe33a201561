"""How much of a click can an explanation that names only its cause carry? (issue 9, target 5)

Target 5 scores an explanation as a cause hit when it names the planted cause and no other genre
of a >= 2-genre target; r_LC rewards whatever tells the scorer the label. The two agree only in a
world where the cause carries (nearly) all of the target's taste signal. This measures that on
the world itself, with no model: for every interaction whose item has 2 genres, the AUC of the
true label against the user's true taste for

  both     the item's two genres (what restating the target's genres with evidence can carry),
  cause    the planted cause alone (what a cause hit can carry),
  other    the other genre alone (what naming the wrong genre can carry),

beside the oracle (the true click probability), the share of interactions whose cause clearly
dominates (|taste of cause| >= 2 |taste of other|), and the paired bootstrap CI of both - cause.
These are true tastes: the most any explanation stating the user's tastes could convey.

    python scripts/cause_information.py "--n-genres 4" "--n-genres 8" "--n-genres 8 --mild-taste 0.3"

Each argument is one world: data_prep.py's synthetic options (its defaults otherwise).
"""
import shlex
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data_prep  # noqa: E402


def world_rows(spec: str) -> dict:
    """Per 2-genre interaction of the world `spec`: label, click probability, taste of the cause
    and of the other genre."""
    args = data_prep.parse_args(["--run-dir", "unused", "--dataset", "synthetic", *shlex.split(spec)])
    _, _, _, truth = data_prep.make_synthetic(args)
    rows = [(y, p, c[cause], next(v for g, v in c.items() if g != cause))
            for y, cause, p, c in truth.values() if len(c) == 2]
    y, p, tc, to = map(np.array, zip(*rows))
    return {"y": y, "p": p, "cause": tc, "other": to}


def report(spec: str, n_boot: int = 200, seed: int = 0) -> str:
    w = world_rows(spec)
    y, scores = w["y"], {"oracle": w["p"], "both": w["cause"] + w["other"],
                         "cause": w["cause"], "other": w["other"]}
    a = {k: roc_auc_score(y, v) for k, v in scores.items()}
    rng = np.random.default_rng(seed)
    d = []
    for _ in range(n_boot):  # paired: the same resampled interactions for both scores
        b = rng.integers(0, len(y), len(y))
        d.append(roc_auc_score(y[b], scores["both"][b]) - roc_auc_score(y[b], scores["cause"][b]))
    lo, hi = np.percentile(d, [2.5, 97.5])
    clear = np.mean(np.abs(w["cause"]) >= 2 * np.abs(w["other"]))
    return (f"| `{spec}` | {len(y)} | {a['oracle']:.3f} | {a['both']:.3f} | {a['cause']:.3f} | "
            f"{a['other']:.3f} | {a['both'] - a['cause']:+.3f} [{lo:+.3f}, {hi:+.3f}] | {clear:.2f} |")


def main(argv=None):
    specs = (sys.argv[1:] if argv is None else argv) or ["--n-genres 4"]
    print("| world (data_prep options) | n (2-genre) | oracle AUC | both AUC | cause AUC | "
          "other AUC | both - cause (95% CI) | cause clear |")
    print("|---|---|---|---|---|---|---|---|")
    for s in specs:
        print(report(s))


if __name__ == "__main__":
    main()
