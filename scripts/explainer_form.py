"""Does a prompt put the untuned explainer in target 5's form? Cause choice under prompt variants.

Target 5 (issue 9) asks explanations to name the planted cause and no other genre of a >= 2-genre
target more often than the prompt echo that restates the target's first genre. Before PPO can
improve the *choice*, the explainer has to produce the *form* (one genre of the target). This
generates the untuned model's greedy explanations of a split's 2-genre targets under each
variant: a question of common.QUESTIONS (the last line of the prompt; the run's own prompt style)
and an optional text the assistant turn starts with (kept in the explanation), and prints
explanation_quality.cause_choice's rows (hit, wrong genre, the echo rows) per variant, and three
examples. Only prompts change; the label never enters them.

    python scripts/explainer_form.py --run-dir runs/planted12 --variant genres \
        --variant cause --variant "genres|The genre that decides is"
"""
from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
import explanation_quality as eq  # noqa: E402
import llm  # noqa: E402
import parallel  # noqa: E402
from common import ExpCTRError  # noqa: E402


def parse_variant(v: str) -> tuple[str, str]:
    q, _, prefix = v.partition("|")
    if q not in common.QUESTIONS:
        raise ExpCTRError(f"--variant {v!r}: question {q!r}, expected one of {', '.join(common.QUESTIONS)}")
    return q, prefix


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", required=True, help="run folder of a synthetic world (data_prep.py)")
    p.add_argument("--split", default="valid", help="whose 2-genre targets (not test)")
    p.add_argument("--variant", action="append", default=[],
                   help="QUESTION or QUESTION|ASSISTANT PREFIX (repeatable; default: the run's question)")
    p.add_argument("--max-targets", type=int, default=0, help="first N targets only (0 = all)")
    p.add_argument("--max-new-tokens", type=int, default=24, help="as the preset's explanations")
    p.add_argument("--gen-batch", type=int, default=32)
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    llm.add_model_args(p)
    a = p.parse_args(argv)
    if a.split == "test":
        raise ExpCTRError("--split test: refused; prompts are chosen on valid")
    paths = common.RunPaths(a.run_dir)
    items, samples = common.load_items(paths), common.load_split(paths, a.split)
    popt = common.prompt_options(paths)
    variants = [parse_variant(v) for v in a.variant] or [(popt["question"], "")]
    idx = eq.choice_targets(samples, items)
    idx = idx[:a.max_targets] if a.max_targets else idx
    if not idx:
        raise ExpCTRError(f"{paths.root} {a.split}: no target with a cause and >= 2 genres")
    targets = [samples[i] for i in idx]  # cause_choice scores these, keyed 0..n-1
    bundle = llm.from_args(llm.run_model(paths, a.model), a, parallel.World())  # one process
    ca = types.SimpleNamespace(min_title_chars=eq.MIN_TITLE_CHARS, min_ground_chars=eq.MIN_GROUND_CHARS,
                               n_boot=a.n_boot, seed=a.seed)
    out = {}
    print(f"untuned explainer, {len(idx)} {a.split} targets with >= 2 genres ({paths.root})\n")
    print("| question | assistant prefix | cause hit [95% CI] | names a wrong genre |\n|---|---|---|---|")
    for q, prefix in variants:
        ids = [bundle.explainer_ids(common.build_prompt(t, items, popt["style"], q), prefix)
               for t in targets]
        comps = []
        for b in range(0, len(ids), a.gen_batch):
            comps += bundle.generate(ids[b:b + a.gen_batch], greedy=True,
                                     max_new_tokens=a.max_new_tokens)
        texts = {j: (prefix + " " + bundle.decode(c)).strip() for j, c in enumerate(comps)}
        cc = eq.cause_choice(targets, items, {"base": texts}, ca)
        r = cc["base"]
        print(f"| {q} | {prefix!r} | {r['cause_hit']:.3f} [{r['cause_hit_ci'][0]:.3f}, "
              f"{r['cause_hit_ci'][1]:.3f}] | {r['wrong_genre']:.3f} |")
        out[f"{q}|{prefix}"] = dict(r, n=cc["n"], examples=[texts[j] for j in range(min(3, len(targets)))])
        out["echo_first_genre"] = cc["echo_first_genre"]
    e = out["echo_first_genre"]
    print(f"| (echo of the first genre) | | {e['cause_hit']:.3f} [{e['cause_hit_ci'][0]:.3f}, "
          f"{e['cause_hit_ci'][1]:.3f}] | {e['wrong_genre']:.3f} |\n")
    for k, v in out.items():
        if k != "echo_first_genre":
            print(f"{k!r}: " + " / ".join(t.replace("\n", " ")[:100] for t in v["examples"]))
    return out


if __name__ == "__main__":
    common.cli(main)
