"""Benchmark: what random numbers cost on CPU, torch's way against ours, side by side in one
process (interleaved repeats, median wall time). Not a test: read the ratios.

  sampling  one rollout chunk: P distinct prompts x K copies (shared prefill), N new tokens,
            sampled at temperature 1 with the explainer LoRA active. torch's way: transformers'
            do_sample, which draws with torch.multinomial (one exponential per vocabulary entry
            and row on CPU); ours: llm.InverseCDFSampler (one uniform per row). Both forced to
            N tokens (min_new_tokens), so they do the same decoding work.
  dropout   one scorer SFT step (the planted preset's design: answer after layer A, LoRA on all
            projections of the L layers below, trained head, frozen lower layers cached), in
            training mode, B sequences of 110-190 tokens. torch's way: peft's nn.Dropout on
            every LoRA input (bernoulli_ masks); ours: ctr_ops.Dropout (counter-based masks).

    python scripts/bench_rng.py                          # SmolLM2-135M, the planted sizes
    python scripts/bench_rng.py --model tiny --repeats 1  # a smoke run
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ctr_ops  # noqa: E402
import llm  # noqa: E402
import stage1_sft  # noqa: E402


def sample_chunk(b, prompts, n_new, sampler: str):
    """One sampled chunk, both forced to n_new tokens and keeping the step scores. inverse-cdf:
    llm.LLM.generate as the rollouts call it (return_logprobs, so its per-token log-softmax is
    timed too); multinomial: the same call to transformers' generate with do_sample."""
    if sampler == "inverse-cdf":
        rows, _ = b.generate(prompts, greedy=False, max_new_tokens=n_new, min_new_tokens=n_new,
                             return_logprobs=True)
        return max(map(len, rows))
    from transformers import GenerationConfig
    ids, mask = b.pad_left(prompts)
    cache = b._shared_prefill(prompts)
    cfg = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=n_new,
                           min_new_tokens=n_new, pad_token_id=b.tok.pad_token_id, eos_token_id=b.eos_id,
                           suppress_tokens=b.suppress, output_scores=True, return_dict_in_generate=True)
    with b.attention("sdpa"):
        out = b.model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg,
                               **({"cache": cache} if cache is not None else {}))
    return out.sequences.shape[1] - ids.shape[1]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--prompts", type=int, default=8, help="sampling: distinct prompts per chunk")
    p.add_argument("--k", type=int, default=4, help="sampling: copies of each prompt")
    p.add_argument("--prompt-tokens", type=int, default=110)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--batch", type=int, default=16, help="dropout: sequences per SFT step")
    p.add_argument("--answer-layer", type=int, default=21)
    p.add_argument("--lora-layers", type=int, default=8)
    a = p.parse_args()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)

    # ---- sampling --------------------------------------------------------------------------
    b = llm.LLM(a.model, a.dtype)
    V = b.base.config.vocab_size
    b.attach({"explainer": None})
    prompts = [torch.randint(0, V, (a.prompt_tokens,), generator=g).tolist() for _ in range(a.prompts)]
    rows = [x for x in prompts for _ in range(a.k)]
    times = {"multinomial": [], "inverse-cdf": []}
    with b.use("explainer"):
        sample_chunk(b, rows, 2, "inverse-cdf")  # warm-up
        for _ in range(a.repeats):
            for s in times:
                t0 = time.perf_counter()
                n = sample_chunk(b, rows, a.new_tokens, s)
                times[s].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nsampling: {len(rows)} rows ({a.prompts} prompts x {a.k}) x {n} new tokens, "
          f"{a.model} ({b.dtype}), median of {a.repeats}, interleaved:")
    print("| sampler | seconds per chunk | per new token, prefill included (ms) | vs multinomial |\n|---|---|---|---|")
    for k in times:
        print(f"| {k} | {med[k]:.2f} | {1e3 * med[k] / n:.0f} | {med['multinomial'] / med[k]:.2f}x |")

    # ---- dropout ---------------------------------------------------------------------------
    b = llm.LLM(a.model, a.dtype)
    b.attach({"scorer": None}, targets=llm.ALL_PROJ, top_layers=a.lora_layers,
             answer_layer=a.answer_layer)
    b.add_answer_head("scorer")
    params = b.trainable("scorer")
    lens = np.random.default_rng(0).integers(110, 190, a.batch).tolist()
    seqs = [torch.randint(0, V, (n,), generator=g).tolist() for n in lens]
    labels = torch.randint(0, 2, (a.batch,), generator=g)
    times = {"torch nn.Dropout": [], "ctr_ops.Dropout": []}
    with b.use("scorer"):
        states = b.lower_states(seqs, a.lora_layers, a.batch)
        b.model.train()
        for r in range(a.repeats + 1):
            for k in times:
                llm.set_lora_dropouts(b.model, ctr_ops.Dropout if k.startswith("ctr_ops") else torch.nn.Dropout)
                t0 = time.perf_counter()
                stage1_sft.scorer_loss(b.upper_answer_logprobs(states, a.lora_layers), labels).backward()
                for q in params:
                    q.grad = None
                if r:  # the first round warms up (numba compiles)
                    times[k].append(time.perf_counter() - t0)
    n_drop = sum(len(getattr(m, "lora_dropout", {})) for m in b.model.modules())
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nscorer SFT step, training mode: {a.batch} sequences, {sum(lens)} tokens, {n_drop} LoRA "
          f"dropouts (answer after layer {a.answer_layer}, LoRA in the {a.lora_layers} below), "
          f"median of {a.repeats}, interleaved:")
    print("| LoRA dropout | seconds per step | vs torch |\n|---|---|---|")
    for k in times:
        print(f"| {k} | {med[k]:.2f} | {med['torch nn.Dropout'] / med[k]:.2f}x |")


if __name__ == "__main__":
    main()
