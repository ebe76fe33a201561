"""Benchmark: transformers' attention kernels (`--attn sdpa` vs `eager`, llm.LLM) on each kind of
forward the pipeline runs: generation of distinct prompts (the explanation steps), generation of
K samples per prompt (rollouts, probes), grouped scoring (r_LC, predictions), grouped log-probs
(logp_old / logp_ref) and one PPO minibatch step (forward + backward). Both kernels in one
process, interleaved, median wall time; fresh adapters with random LoRA B. Not a test: numbers
depend on the machine; read the ratios. (An LLM built with --attn eager runs generate() on sdpa;
this one is built with sdpa and switched with LLM.attention(), which generate() then follows, so
the generate rows show each kernel for the whole call: why generation stays on sdpa.)

    python scripts/bench_attention.py                      # SmolLM2-135M, dtype auto (bf16 here)
    python scripts/bench_attention.py --model tiny --dtype float32 --repeats 1 --prompts 4
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import llm  # noqa: E402
from bench_generation import distinct_samples  # noqa: E402 (this folder is on the path)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--prompts", type=int, default=32, help="distinct prompts (a --gen-batch)")
    p.add_argument("--k", type=int, default=4, help="samples per prompt in the K-sample rows")
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--batch", type=int, default=16, help="--fwd-batch and the PPO minibatch")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    b = llm.LLM(a.model, a.dtype, threads=a.threads)
    b.attach({"explainer": None, "scorer": None})
    b.scorer_view = "target"
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, prm in b.model.named_parameters():
            if "lora_B" in n:
                prm.copy_(torch.randn(prm.shape, generator=g) * 1e-2)
    samples, items = distinct_samples(a.prompts)
    texts = [common.build_prompt(s, items) for s in samples]
    pids = [b.explainer_ids(t) for t in texts]
    kp = [x for x in pids[: max(1, a.prompts // a.k)] for _ in range(a.k)]
    torch.manual_seed(0)
    with b.use("explainer"):
        comps = b.generate(kp, greedy=False, max_new_tokens=a.new_tokens)
    expls = [b.decode(c) or "none" for c in comps]
    targets = [common.describe_item(items[s["iid"]], s["iid"]) for s in samples]
    sp = [texts[i % len(texts)] for i in range(len(expls))]
    st = [targets[i % len(targets)] for i in range(len(expls))]

    def generate(prompts, greedy):
        def run():
            with b.use("explainer"):
                torch.manual_seed(0)
                b.generate(prompts, greedy=greedy, max_new_tokens=a.new_tokens)
        return run

    def score():
        b.scorer_logprobs(sp, expls, st, a.batch)

    def logp():
        with b.use("explainer"), torch.inference_mode():
            b.completion_logprobs_grouped(kp, comps, a.batch)

    def ppo_step():
        with b.use("explainer"):
            lp = b.completion_logprobs(kp[: a.batch], comps[: a.batch], entropy=True)[0]
            torch.cat(lp).float().sum().backward()
        b.model.zero_grad(set_to_none=True)

    rows = [(f"generate {len(pids)} distinct prompts x {a.new_tokens} (greedy)", generate(pids, True)),
            (f"generate {len(kp) // a.k} prompts x K={a.k} x {a.new_tokens} (sampled)", generate(kp, False)),
            (f"score {len(expls)} inputs (view target, grouped)", score),
            (f"log-probs of {len(kp)} completions (grouped)", logp),
            (f"PPO minibatch of {min(a.batch, len(kp))}: forward + backward", ppo_step)]
    times = {(name, k): [] for name, _ in rows for k in llm.ATTENTION}
    for rep in range(a.repeats + 1):  # the first round warms up
        for impl in llm.ATTENTION:
            with b.attention(impl):
                for name, fn in rows:
                    t0 = time.perf_counter()
                    fn()
                    if rep:
                        times[(name, impl)].append(time.perf_counter() - t0)
    print(f"\n{a.model} ({b.dtype}), {torch.get_num_threads()} threads, median of {a.repeats} "
          f"interleaved rounds after one warm-up\n")
    print("| forward | sdpa s | eager s | eager speed-up |\n|---|---|---|---|")
    for name, _ in rows:
        s, e = (statistics.median(times[(name, k)]) for k in ("sdpa", "eager"))
        print(f"| {name} | {s:.2f} | {e:.2f} | {s / max(e, 1e-9):.2f}x |", flush=True)


if __name__ == "__main__":
    main()
