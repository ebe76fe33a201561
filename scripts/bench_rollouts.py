"""Where one PPO iteration's rollout time goes, and what prefix KV reuse saves.
Side by side in one process, alternating, same prompts, same seed:
  before = every sequence runs its own forward pass (llm.LLM.share_prefix = False),
  after  = a prompt's forward runs once for its K samples (generation prefill, r_LC scoring,
           logp_old, logp_ref) and once for all scorer variants of a prompt.
Prints seconds per phase (median of --repeats) and the speed-up. A benchmark, not a test: the
2 shared cores of the development machine are noisy, so read ratios, not absolute times.

    python scripts/bench_rollouts.py --run-dir runs/planted --prompts 8 --k 4

--predictions instead times the predictions step's scorer pass (stage1_sft.predict_p_chunked,
chunks of --batch prompts' worth, as `stage1_sft.py --predict` runs it) on the first --prompts
test prompts: no text, and each of --tags' explanations with --shuffles permutations of them,
the inputs grouped by prompt (before) or as the scorer's view groups them
(llm_reuse.PrefixReuse.scorer_groups: view "target" shares each explanation's forward across
the permutations that read it). Needs R/explanations/TAG/test.jsonl for every tag.

    python scripts/bench_rollouts.py --run-dir runs/planted/planted --predictions --prompts 64
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch  # noqa: E402

import common  # noqa: E402
import llm  # noqa: E402
import parallel  # noqa: E402
import stage1_sft  # noqa: E402
import stage2_reward  # noqa: E402


def time_predictions(a, paths, model) -> None:
    """The predictions step's scorer pass, its inputs grouped by prompt vs by scorer_groups."""
    import numpy as np
    items, popt = common.load_items(paths), common.prompt_options(paths)
    every = common.load_split(paths, "test")
    rows = every[: a.prompts]
    prompts = [common.build_prompt(r, items, **popt) for r in rows]
    targets = [common.target_text(r, items) for r in rows]
    variants = [[None] * len(rows)]
    for tag in a.tags.split(","):
        ex = [e["explanation"] for e in common.load_explanations(paths, tag, "test", every)][: a.prompts]
        variants += [ex] + [[ex[q] for q in np.random.default_rng([0, j]).permutation(len(rows))]
                            for j in range(a.shuffles)]
    bundle = llm.LLM(model, a.dtype)
    bundle.attach({"scorer": paths.scorer})
    own = bundle.scorer_groups
    by_prompt = lambda P, E: [("prompt", p) for p in P]  # noqa: E731 (the grouping before)
    times, out = {"by prompt": [], "scorer_groups": []}, {}
    for rep in range(a.repeats):
        for k in times:
            bundle.scorer_groups = by_prompt if k == "by prompt" else own
            t0 = time.time()
            out[k] = stage1_sft.predict_p_chunked(parallel.World(), bundle, prompts, variants,
                                                  a.batch, targets)
            times[k].append(time.time() - t0)
            print(f"rep {rep} {k}: {times[k][-1]:.1f}s", flush=True)
    b, s = (statistics.median(times[k]) for k in times)
    diff = float(np.abs(out["by prompt"] - out["scorer_groups"]).max())
    print(f"\n{len(rows)} test prompts x {len(variants)} scorer inputs (none; {a.tags} x (own + "
          f"{a.shuffles} shuffles)), view {bundle.scorer_view}, {bundle.dtype}, batch {a.batch}, "
          f"{torch.get_num_threads()} threads, median of {a.repeats}; max |p difference| {diff:.2g}")
    print(f"| inputs grouped | seconds |\n|---|---|\n| by prompt (before) | {b:.1f} |\n"
          f"| scorer_groups | {s:.1f} |\n| speed-up | {b / max(s, 1e-9):.2f}x |")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", required=True, help="a run folder with data/ and scorer/")
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--prompts", type=int, default=8, help="RL prompts (like --prompts-per-iter)")
    p.add_argument("--k", type=int, default=4, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=16, help="--gen-batch and --fwd-batch")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--predictions", action="store_true",
                   help="instead: the predictions step's scorer pass, grouped by prompt vs scorer_groups")
    p.add_argument("--tags", default="base,iter_9", help="--predictions: explanation tags")
    p.add_argument("--shuffles", type=int, default=5, help="--predictions: permutations per tag")
    a = p.parse_args()
    paths = common.RunPaths(a.run_dir)
    model = llm.run_model(paths, a.model)
    if a.predictions:
        return time_predictions(a, paths, model)
    items, popt = common.load_items(paths), common.prompt_options(paths)
    rl = common.load_split(paths, "rl")[: a.prompts]
    samples = [s for s in rl for _ in range(a.k)]
    bundle = llm.LLM(model, a.dtype)
    bundle.attach({"scorer": paths.scorer, "explainer": None})
    for n, w in bundle.model.named_parameters():  # a policy that differs from the reference
        if ".explainer." in n and "lora_B" in n:
            torch.nn.init.normal_(w, std=1e-3, generator=torch.Generator().manual_seed(0))
    args = argparse.Namespace(gen_batch=a.batch, fwd_batch=a.batch, max_new_tokens=a.max_new_tokens,
                              temperature=1.0, save_every=10**9, aug=None, encoder=None, lambda_ic=0.0)
    times = {True: [], False: []}
    for rep in range(a.repeats):
        for share in (False, True):
            bundle.share_prefix = share
            t0 = time.time()
            res = stage2_reward.sample_and_score(bundle, "explainer", samples, items, args, seed=1,
                                                 desc=f"{'shared' if share else 'plain'} {rep}", popt=popt,
                                                 world=parallel.World())
            res["timings"]["total"] = time.time() - t0
            times[share].append(res["timings"])
            print(f"rep {rep} share_prefix={share}: " +
                  ", ".join(f"{k} {v:.1f}s" for k, v in res["timings"].items()), flush=True)
    med = {s: {k: statistics.median(t[k] for t in times[s]) for k in times[s][0]} for s in times}
    mean_len = sum(len(bundle.explainer_ids(common.build_prompt(s, items, **popt))) for s in rl) / len(rl)
    print(f"\n{len(samples)} rollouts ({a.prompts} prompts x K={a.k}, prompt {mean_len:.0f} tokens, "
          f"<= {a.max_new_tokens} new tokens), {bundle.dtype}, {torch.get_num_threads()} threads, "
          f"median of {a.repeats}:")
    print("| phase | before (s) | after, prefix KV reuse (s) | speed-up |\n|---|---|---|---|")
    for k in ("generate", "r_lc", "logp_old", "logp_ref", "total"):
        b, s = med[False][k], med[True][k]
        print(f"| {k} | {b:.1f} | {s:.1f} | {b / max(s, 1e-9):.2f}x |")


if __name__ == "__main__":
    main()
