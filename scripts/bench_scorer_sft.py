"""One scorer SFT step, three ways, side by side in one process (a benchmark, not a test: read the
ratios on a noisy shared CPU). SmolLM2-135M, B sequences of T random tokens, LoRA (all seven
projections) in the top N layers of the answer layer's stack, trained answer head:

  full      every layer forward each step, backward through the top N (stage1_sft without a
            cache, the old path);
  cached    the frozen lower layers' states computed once (llm.lower_states), each step runs
            the top N layers only (stage1_sft --lora-layers N);
  + once    the one-off cost of computing those states for the batch (paid once per sample,
            however many epochs follow).

    python scripts/bench_scorer_sft.py --answer-layer 21 --lora-layers 8 --batch 16 --tokens 150
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch  # noqa: E402

import llm  # noqa: E402
import stage1_sft  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--tokens", type=int, default=150)
    p.add_argument("--answer-layer", type=int, default=0, help="0 = the top layer")
    p.add_argument("--lora-layers", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    b = llm.LLM(a.model, a.dtype)
    b.attach({"scorer": None}, targets=llm.ALL_PROJ, top_layers=a.lora_layers,
             answer_layer=a.answer_layer)
    b.add_answer_head("scorer")
    params = b.trainable("scorer")
    g = torch.Generator().manual_seed(0)
    V = b.base.config.vocab_size
    seqs = [torch.randint(0, V, (a.tokens,), generator=g).tolist() for _ in range(a.batch)]
    labels = torch.randint(0, 2, (a.batch,), generator=g)
    times = {"full": [], "cached": [], "+ once": []}
    with b.use("scorer"):
        for _ in range(a.repeats):  # alternate the paths
            t0 = time.time()
            states = b.lower_states(seqs, a.lora_layers, a.batch)
            times["+ once"].append(time.time() - t0)
            for path in ("full", "cached"):
                t0 = time.time()
                lp = (b.answer_logprobs(seqs) if path == "full"
                      else b.upper_answer_logprobs(states, a.lora_layers))
                stage1_sft.scorer_loss(lp, labels).backward()
                for q in params:
                    q.grad = None
                times[path].append(time.time() - t0)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    depth = a.answer_layer or b.n_layers
    print(f"\none scorer SFT step, {a.batch} x {a.tokens} tokens, {a.model} ({b.dtype}), answer after "
          f"layer {depth} of {b.n_layers}, LoRA in the top {a.lora_layers} of those "
          f"(median of {a.repeats}):")
    print("| path | seconds per step | vs full |\n|---|---|---|")
    for k in ("full", "cached", "+ once"):
        print(f"| {k} | {med[k]:.2f} | {med[k] / med['full']:.2f}x |")


if __name__ == "__main__":
    main()
