"""Where one PPO iteration's rollout time goes, and what prefix KV reuse saves.
Side by side in one process, alternating, same prompts, same seed:
  before = every sequence runs its own forward pass (llm.LLM.share_prefix = False),
  after  = a prompt's forward runs once for its K samples (generation prefill, r_LC scoring,
           logp_old, logp_ref) and once for all scorer variants of a prompt.
Prints seconds per phase (median of --repeats) and the speed-up. A benchmark, not a test: the
2 shared cores of the development machine are noisy, so read ratios, not absolute times.

    python scripts/bench_rollouts.py --run-dir runs/planted --prompts 8 --k 4
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
import stage2_reward  # noqa: E402


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
    a = p.parse_args()
    paths = common.RunPaths(a.run_dir)
    model = llm.run_model(paths, a.model)
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
