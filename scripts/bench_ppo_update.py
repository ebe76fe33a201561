"""Benchmark: one PPO iteration's update (stage3_rl.py) with the explainer LoRA in every decoder
layer (the default) vs in the top N layers only (--lora-layers N), where the frozen lower layers
run once over the rollouts and each of the --ppo-epochs runs the top N alone. Both variants in one
process, interleaved repeats, median wall time: R rollouts of prompt + completion tokens,
minibatches of M, forward + backward + AdamW step, as stage3_rl does them. Not a test: numbers
depend on the machine; read the ratio.

    python scripts/bench_ppo_update.py                                  # SmolLM2-135M, bf16
    python scripts/bench_ppo_update.py --model tiny --dtype float32 --rollouts 8 --minibatch 4
    python scripts/bench_ppo_update.py --top "" --attn sdpa,eager      # the attention kernel
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import llm  # noqa: E402
import parallel  # noqa: E402


def one_iteration(b: llm.LLM, prompts, comps, a, n_top: int) -> float:
    """Seconds of one PPO iteration's update (the loss is a stand-in: sum of log-probs)."""
    params = b.trainable("explainer")
    opt = torch.optim.AdamW(params, lr=1e-6)
    t0 = time.perf_counter()
    with b.use("explainer"):
        states = (llm.lower_states_chunked(parallel.init("cpu"), b, [p + c for p, c in zip(prompts, comps)],
                                           n_top, a.minibatch, "lower") if n_top else None)
        for _ in range(a.ppo_epochs):
            for s in range(0, len(prompts), a.minibatch):
                idx = list(range(s, min(s + a.minibatch, len(prompts))))
                opt.zero_grad(set_to_none=True)
                if n_top:
                    lp, _ = b.upper_completion_logprobs([states[i] for i in idx], [comps[i] for i in idx],
                                                        n_top, entropy=True)
                else:
                    lp, _ = b.completion_logprobs([prompts[i] for i in idx], [comps[i] for i in idx],
                                                  entropy=True)
                torch.cat(lp).float().sum().backward()
                opt.step()
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--rollouts", type=int, default=128, help="rollouts of one iteration (32 x K=4)")
    p.add_argument("--prompt-len", type=int, default=110, help="prompt tokens (planted preset ~110)")
    p.add_argument("--completion-len", type=int, default=24)
    p.add_argument("--minibatch", type=int, default=16)
    p.add_argument("--ppo-epochs", type=int, default=2)
    p.add_argument("--top", default="10", help="comma-separated N of --lora-layers to compare")
    p.add_argument("--targets", default="all", help="LoRA projections of the top-N variants")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--attn", default="sdpa", help="comma-separated attention implementations of "
                   "transformers to compare (sdpa, eager); every LoRA variant runs with each")
    a = p.parse_args()
    torch.manual_seed(0)
    probe = llm.LLM(a.model, a.dtype)
    V = probe.tok.vocab_size
    prompts = [torch.randint(100, V - 100, (a.prompt_len,)).tolist() for _ in range(a.rollouts)]
    comps = [torch.randint(100, V - 100, (a.completion_len,)).tolist() for _ in range(a.rollouts)]
    lora = [("all layers, q/v", 0, llm.LORA_TARGETS)] + [
        (f"top {n}, {a.targets}", n, llm.ALL_PROJ if a.targets == "all" else tuple(a.targets.split(",")))
        for n in (map(int, a.top.split(",")) if a.top else ())]
    attns = a.attn.split(",")
    variants = [(name + (f", {attn} attention" if len(attns) > 1 else ""), n, targets, attn)
                for name, n, targets in lora for attn in attns]
    bundles = []
    for _, n, targets, attn in variants:
        b = llm.LLM(a.model, a.dtype, attn=attn)
        b.attach({"explainer": None}, targets=targets, top_layers=n)
        b.model.eval()
        bundles.append(b)
    times = {v[0]: [] for v in variants}
    for _ in range(a.repeats):
        for (name, n, _, _), b in zip(variants, bundles):
            times[name].append(one_iteration(b, prompts, comps, a, n))
    print(f"\nPPO update of one iteration: {a.rollouts} rollouts of {a.prompt_len} + {a.completion_len} "
          f"tokens, minibatch {a.minibatch}, {a.ppo_epochs} epochs; {a.model} ({probe.dtype}), "
          f"{torch.get_num_threads()} threads, median of {a.repeats} interleaved runs\n")
    print("| LoRA | trainable params | median s | speed-up |\n|---|---|---|---|")
    base = statistics.median(times[variants[0][0]])
    for (name, _, _, _), b in zip(variants, bundles):
        med = statistics.median(times[name])
        n_par = sum(x.numel() for x in b.trainable("explainer"))
        print(f"| {name} | {n_par:,} | {med:.1f} | {base / med:.2f}x |")


if __name__ == "__main__":
    main()
