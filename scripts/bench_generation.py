"""Benchmark: sampled generation with the LoRA adapter unmerged (what stage2_reward.py does) vs
merged into the base weights (what it did before; wrong in bf16, where most of a small LoRA update
rounds away). Side by side in one process, interleaved repeats, median wall time; also reports how
much of the update a bf16 merge loses. Not a test: numbers depend on the machine.

    python scripts/bench_generation.py                    # SmolLM2-135M, fp32 and bf16
    python scripts/bench_generation.py --model tiny --dtypes float32 --repeats 2

--lm-head instead times greedy generation of --prompts distinct prompts (the explanation step's
case: every prompt its own prefill) at each of --batches, with the lm_head's contiguous-input
hook (llm.LLM.lm_head_hook) and without it, interleaved: without it torch expands the frozen
[V, H] lm_head weight to one copy per row when the last position's hidden state arrives as a
strided [B, 1, H] view. Also times that product alone, strided vs contiguous.

    python scripts/bench_generation.py --lm-head --dtypes bfloat16 --batches 32,128
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import llm  # noqa: E402


@contextlib.contextmanager
def merged(bundle, name):
    """The old path: add the fp32 LoRA delta into the base weights, restore them afterwards."""
    from peft.tuners.lora import LoraLayer
    bundle.model.set_adapter(name)
    layers = [m for m in bundle.model.modules() if isinstance(m, LoraLayer)]
    saved = [m.get_base_layer().weight.data.clone() for m in layers]
    with torch.no_grad():
        bundle.model.merge_adapter([name])
    try:
        yield
    finally:
        with torch.no_grad():
            for m, w in zip(layers, saved):
                m.get_base_layer().weight.data.copy_(w)
                m.merged_adapters.clear()


def merge_loss(bundle, name) -> tuple[float, float]:
    """Share of merged weights left exactly unchanged, and relative error of the merged update."""
    from peft.tuners.lora import LoraLayer
    unchanged, err, norm = 0.0, 0.0, 0.0
    layers = [m for m in bundle.model.modules() if isinstance(m, LoraLayer)]
    for m in layers:
        w = m.get_base_layer().weight.data
        delta = m.get_delta_weight(name).float()
        got = (w.float() + delta).to(w.dtype).float() - w.float()
        unchanged += float((got == 0).float().mean()) / len(layers)
        err, norm = err + float((got - delta).norm() ** 2), norm + float(delta.norm() ** 2)
    return unchanged, (err / norm) ** 0.5


def distinct_samples(n: int) -> tuple[list[dict], dict]:
    """n samples whose prompts all differ (target i, history i+1..i+6 with varied signs) and their
    items: the explanation step's case, where no two prompts share a prefill."""
    items = {str(i): {"title": f"Film {i}", "genres": ["Drama", "Comedy", "Horror"][i % 3:]}
             for i in range(n + 6)}
    samples = [{"uid": "1", "iid": str(i), "label": 0, "ts": 0,
                "hist": [[str(i + 1 + j), (i >> j) & 1] for j in range(6)]} for i in range(n)]
    return samples, items


def time_lm_head(a) -> None:
    """Greedy generation of distinct prompts with and without the lm_head hook; the product alone."""
    print(f"| dtype | batch | lm_head input | product alone, ms | {a.prompts} prompts x "
          f"{a.new_tokens} new tokens, median s ({a.repeats} runs) |\n|---|---|---|---|---|")
    for dtype in a.dtypes.split(","):
        b = llm.LLM(a.model, dtype, threads=a.threads)
        b.attach({"explainer": None})
        head = b.base.get_output_embeddings()
        b.lm_head_hook.remove()  # each run below registers it or not
        samples, items = distinct_samples(a.prompts)
        prompts = [b.explainer_ids(common.build_prompt(s, items)) for s in samples]
        assert len({tuple(x) for x in prompts}) == len(prompts)  # (copies would share a prefill)
        for B in [int(x) for x in a.batches.split(",")]:
            times = {"contiguous (hook)": [], "strided view (no hook)": []}
            with torch.inference_mode():
                h = torch.randn(B, 100, head.weight.shape[1], dtype=head.weight.dtype)[:, -1:]
                alone = {}
                for k, x in (("contiguous (hook)", h.contiguous()), ("strided view (no hook)", h)):
                    torch.nn.functional.linear(x, head.weight)  # warm-up
                    t0 = time.perf_counter()
                    torch.nn.functional.linear(x, head.weight)
                    alone[k] = (time.perf_counter() - t0) * 1e3
            with b.use("explainer"):
                for _ in range(a.repeats):
                    for k in times:
                        hook = (head.register_forward_pre_hook(llm._contiguous_input)
                                if k.startswith("contiguous") else None)
                        t0 = time.perf_counter()
                        for i in range(0, len(prompts), B):
                            b.generate(prompts[i:i + B], greedy=True, max_new_tokens=a.new_tokens)
                        times[k].append(time.perf_counter() - t0)
                        if hook is not None:
                            hook.remove()
            for k, ts in times.items():
                print(f"| {dtype} | {B} | {k} | {alone[k]:.1f} | {statistics.median(ts):.2f} |", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--lora-b-std", type=float, default=1e-3, help="std of LoRA B (a few dozen Adam steps)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lm-head", action="store_true",
                   help="instead: greedy generation with and without the lm_head's contiguous-input hook")
    p.add_argument("--batches", default="32,128", help="--lm-head: generate() batch sizes")
    p.add_argument("--prompts", type=int, default=128, help="--lm-head: distinct prompts per run")
    a = p.parse_args()
    if a.lm_head:
        return time_lm_head(a)
    sample = {"uid": "1", "iid": "1", "label": 0, "ts": 0, "hist": []}
    print(f"| dtype | path | median s ({a.repeats} runs) | tokens/s | bf16-merge: weights unchanged | "
          f"merged update rel. error |\n|---|---|---|---|---|---|")
    for dtype in a.dtypes.split(","):
        b = llm.LLM(a.model, dtype, threads=a.threads)
        b.attach({"explainer": None})
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for n, prm in b.model.named_parameters():
                if "lora_B.explainer" in n:
                    prm.copy_(torch.randn(prm.shape, generator=g) * a.lora_b_std)
        prompts = [b.explainer_ids(common.build_prompt(sample, {}))] * a.batch
        times = {"unmerged": [], "merged": []}
        toks = {}
        for _ in range(a.repeats):
            for path in times:
                ctx = b.use("explainer") if path == "unmerged" else merged(b, "explainer")
                torch.manual_seed(0)
                t0 = time.perf_counter()
                with ctx:
                    out = b.generate(prompts, greedy=False, max_new_tokens=a.new_tokens)
                times[path].append(time.perf_counter() - t0)
                toks[path] = sum(len(o) for o in out)
        unchanged, rel = merge_loss(b, "explainer")
        for path, ts in times.items():
            med = statistics.median(ts)
            print(f"| {dtype} | {path} | {med:.2f} | {toks[path] / med:.1f} | "
                  f"{unchanged:.1%} | {rel:.1%} |" if path == "merged" else
                  f"| {dtype} | {path} | {med:.2f} | {toks[path] / med:.1f} | - | - |", flush=True)


if __name__ == "__main__":
    main()
