"""Which explanation does the LC reward prefer? A diagnostic of the reward's optimum (issue 9,
target 5: "alignment finds the truth"), on valid only.

PPO can only move the explainer toward what r_LC = log p_scorer(truth | target, explanation)
ranks higher. This script scores hand-built "explanations" of the valid samples of a planted run
with its trained scorer and prints the mean r_LC of each, with 95% bootstrap CIs and paired
differences (the same samples under every template):
  none          no explanation (the scorer's prior for the target)
  profile       the user's whole liked/disliked genre profile (what the untuned model and the
                aligned one restate; a third of the scorer's training texts)
  target_genres the profile restricted to the target's genres (names every genre of the target)
  cause         the profile restricted to the planted cause, the genre that decided the click
  other         the profile restricted to another genre of the target (a wrong cause)
  echo          the prompt-echo baseline (evaluate's; restates the target and its genres)
  profile_cut   (--budget N) the profile cut to its first N tokens, what an explainer restating
                the profile writes when generation stops at --max-new-tokens N
  target_genres_cut, cause_cut, other_cut  (--budget N) the same statements cut the same
                way: a one-genre statement takes 15-20 tokens on the planted world, so at N = 16
                it is cut too, and profile_cut is compared fairly with these, not the uncut 'cause'
'cause' and 'other' exist only on targets with >= 2 genres, where naming one is a real choice;
every template is scored on those targets (n printed). A reward that ranks 'profile' above
'cause' teaches the explainer to restate the profile, which names a wrong genre (hit 0 in
evaluate's cause_choice); one that ranks 'cause' above 'other' carries the truth, so a budget
that leaves room for one genre only would make naming the cause the reward's optimum.

    python scripts/reward_templates.py --run-dir runs/planted [--n 256] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import numpy as np  # noqa: E402

import common  # noqa: E402
import explanation_quality as eq  # noqa: E402
import llm  # noqa: E402
import stage1_sft  # noqa: E402
import stage2_reward  # noqa: E402
from metrics import percentile_ci  # noqa: E402


def templates(sample: dict, items: dict, popt: dict, cut=None) -> dict[str, str | None]:
    gs = list(items[sample["iid"]]["genres"])
    cause = sample["cause"]
    other = next(g for g in gs if g != cause)
    part = lambda keep: stage1_sft.profile_echo(sample, items, popt, keep)  # a partial profile
    out = {"none": None,
           "profile": part(None),
           "target_genres": part(set(gs)),
           "cause": part({cause}),
           "other": part({other}),
           "echo": eq.prompt_echo(sample, items)}
    if cut:  # the same statements, cut to the budget
        out.update({f"{k}_cut": cut(out[k]) for k in ("profile", "target_genres", "cause", "other")})
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", required=True, help="planted run folder with data/ and scorer/")
    p.add_argument("--n", type=int, default=256, help="valid samples at most")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--budget", type=int, default=0,
                   help="also score the profile cut to its first N tokens (0: not)")
    p.add_argument("--out", default=None, help="also write the figures as JSON here")
    a = p.parse_args()
    paths = common.RunPaths(a.run_dir)
    items, popt = common.load_items(paths), common.prompt_options(paths)
    valid = [s for s in common.load_split(paths, "valid")[:a.n]
             if s.get("cause") and len(items[s["iid"]]["genres"]) >= 2]
    if not valid:
        sys.exit(f"{paths.data}/valid.jsonl: no sample with a planted cause and >= 2 target genres")
    bundle = llm.LLM(llm.run_model(paths, None), a.dtype)
    bundle.attach({"scorer": paths.scorer})
    cut = (lambda text: bundle.decode(bundle.encode(text)[:a.budget])) if a.budget else None
    rows = [templates(s, items, popt, cut) for s in valid]
    names = list(rows[0])
    prompts = [common.build_prompt(s, items, **popt) for s in valid]
    targets = [common.target_text(s, items) for s in valid]
    labels = [s["label"] for s in valid]
    r = {k: stage2_reward.lc_reward(bundle, prompts, [t[k] for t in rows], labels, a.batch, targets)
         for k in names}
    B = np.random.default_rng([a.seed, 3]).integers(0, len(valid), (a.n_boot, len(valid)))
    out = {"run_dir": str(paths.root), "n": len(valid), "split": "valid",
           "constant_predictor": float(np.mean(stage2_reward.label_logprob(
               np.full(len(labels), np.mean(labels)), np.asarray(labels))))}
    print(f"r_LC of hand-built explanations, {len(valid)} valid samples with >= 2 target genres "
          f"({paths.root}); constant predictor {out['constant_predictor']:.4f}\n")
    print("| template | mean r_LC | 95% CI | minus cause | 95% CI |\n|---|---|---|---|---|")
    for k in names:
        d = r[k] - r["cause"]
        out[k] = {"r_lc": float(r[k].mean()), "ci": percentile_ci(r[k][B].mean(1)),
                  "minus_cause": float(d.mean()), "minus_cause_ci": percentile_ci(d[B].mean(1))}
        ci, dci = out[k]["ci"], out[k]["minus_cause_ci"]
        print(f"| {k} | {out[k]['r_lc']:.4f} | [{ci[0]:.4f}, {ci[1]:.4f}] | {d.mean():+.4f} | "
              f"[{dci[0]:+.4f}, {dci[1]:+.4f}] |")
    if a.budget:  # the fair comparison under the budget: both statements cut to N tokens
        for k in ("profile_cut", "target_genres_cut", "other_cut"):
            d = r[k] - r["cause_cut"]
            ci = percentile_ci(d[B].mean(1))
            out[f"{k}_minus_cause_cut"] = {"mean": float(d.mean()), "ci": ci}
            print(f"- {k} minus cause_cut (paired): {d.mean():+.4f} [{ci[0]:+.4f}, {ci[1]:+.4f}]")
    if a.out:
        common.write_json(a.out, out)


if __name__ == "__main__":
    main()
