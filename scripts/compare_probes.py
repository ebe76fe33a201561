"""Is policy A better than policy B on the reward probe? Two probe files of the same held-out
prompts, K and sampling seed (R/probe/<tag>.jsonl, written by `stage2_reward.py --probe TAG`),
possibly from two run folders that share a scorer: e.g. two PPO settings started from one
scorer and one base policy. Prints each policy's mean r_LC and the paired difference A - B with
a 95% bootstrap CI over prompts (a prompt's K samples are resampled together, as in evaluate.py's
probe curve) and a one-sided p of "A is no better than B".

    python scripts/compare_probes.py --a runs/x/probe/iter_8.jsonl --b runs/y/probe/iter_8.jsonl \\
        [--base runs/x/probe/base.jsonl] [--name-a qv --name-b top8] [--exclude old/data/probe.jsonl]

--exclude FILE leaves out the probe prompts whose (uid, iid) is a sample of FILE (e.g. the
prompts an earlier, smaller probe had already shown): the comparison on fresh prompts only.

The comparison is only like with like when both files score the same prompts with the same
scorer; the script checks the prompts, the labels and the group layout, and says so if they
differ. The scorer is the reader's responsibility (same run folder copied, or same scorer/)."""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
from common import ExpCTRError  # noqa: E402
from evaluate import paired_p_value, prompt_means, read_probe  # noqa: E402
from metrics import percentile_ci  # noqa: E402


def per_prompt(path: str, ref_key=None, exclude=frozenset()):
    """(mean r_LC per probe prompt, key of the rows, mean KL to the reference, number of prompts
    left out) of one probe file; with ref_key, the file must hold the same prompts, labels and
    groups in the same order. Prompts whose (uid, iid) is in `exclude` are left out (groups
    renumbered in order)."""
    rows = read_probe(Path(path))
    n_all = len({r["group"] for r in rows})
    if exclude:
        rows = [r for r in rows if (r["uid"], r["iid"]) not in exclude]
        if not rows:
            raise ExpCTRError(f"{path}: every prompt is excluded")
        renum = {g: i for i, g in enumerate(dict.fromkeys(r["group"] for r in rows))}
        rows = [dict(r, group=renum[r["group"]]) for r in rows]
        if len(renum) == n_all:
            raise ExpCTRError(f"none of the --exclude samples is a prompt of {path}: nothing left out")
    key = [(r["uid"], r["iid"], r["group"], r["label"]) for r in rows]
    if ref_key is not None and key != ref_key:
        raise ExpCTRError(f"{path}: other prompts, labels or groups than the first file: not like with like")
    means = prompt_means(rows, [r["r_lc"] for r in rows])
    return means, key, float(np.mean([r.get("kl_ref") or 0.0 for r in rows])), n_all - len(means)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--a", required=True, help="probe file of policy A")
    p.add_argument("--b", required=True, help="probe file of policy B (same prompts)")
    p.add_argument("--base", default=None, help="probe file of the base policy (same prompts): also prints A - base, B - base")
    p.add_argument("--name-a", default="A")
    p.add_argument("--name-b", default="B")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exclude", default=None, metavar="FILE",
                   help="JSONL of samples: leave out the probe prompts with their (uid, iid)")
    a = p.parse_args(argv)
    ex = frozenset()
    if a.exclude:
        rows = common.read_jsonl(a.exclude)
        for i, r in enumerate(rows, 1):
            if "uid" not in r or "iid" not in r:
                raise ExpCTRError(f"{a.exclude}:{i}: expected a sample with 'uid' and 'iid'")
        ex = frozenset((r["uid"], r["iid"]) for r in rows)
    A, key, kl_a, left_out = per_prompt(a.a, None, ex)
    B, _, kl_b, _ = per_prompt(a.b, key, ex)
    files = {a.name_a: (A, kl_a), a.name_b: (B, kl_b)}
    if a.base:
        base, _, kl, _ = per_prompt(a.base, key, ex)
        files["base"] = (base, kl)
    resample = np.random.default_rng(a.seed).integers(0, len(A), size=(a.n_boot, len(A)))
    boot = {k: v[0][resample].mean(1) for k, v in files.items()}
    print(f"{len(A)} prompts x {len(key) // len(A)} samples; 95% bootstrap CI over prompts, "
          f"{a.n_boot} resamples" + (f" ({left_out} prompts of {a.exclude} left out)" if ex else "") + "\n")
    print("| policy | mean r_LC [95% CI] | KL to ref |\n|---|---|---|")
    for k, (v, kl) in files.items():
        lo, hi = percentile_ci(boot[k])
        print(f"| {k} | {v.mean():.4f} [{lo:.4f}, {hi:.4f}] | {kl:.4f} |")
    print("\n| difference | Δ mean r_LC [95% CI] | p (one-sided, H1: Δ > 0) |\n|---|---|---|")
    pairs = [(a.name_a, a.name_b)] + ([(a.name_a, "base"), (a.name_b, "base")] if a.base else [])
    for x, y in pairs:
        lo, hi = percentile_ci(boot[x] - boot[y])
        pv = paired_p_value(boot[x], boot[y])
        print(f"| {x} - {y} | {files[x][0].mean() - files[y][0].mean():+.4f} [{lo:+.4f}, {hi:+.4f}] | {pv:.4f} |")


if __name__ == "__main__":
    try:
        main()
    except ExpCTRError as e:
        sys.exit(f"compare_probes.py: {e}")
