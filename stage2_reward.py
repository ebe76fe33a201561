"""Rollouts and rewards of ExpCTR (PAPER_NOTES.md §2-4): sample explanations, score them.

Paper part: the two alignment rewards. For each RL prompt the explainer (LoRA adapter
`explainer`, policy of iteration k-1) samples K explanations; each is scored by
  r_LC = log p_scorer(true label | prompt, explanation)        (LC alignment, the LLM-CTR scorer;
         with the scorer's view "target" the explanation stands in for the user's history)
  r_IC = log p_aug(true label | ID features, emb(explanation))  (IC alignment, the ExpCTR-Aug model)
  r    = r_LC + lambda * r_IC     (Phase 1, LC alignment: lambda = 0; Phase 3, IC alignment: > 0).
It also stores the per-token log-probs of each explanation under the explainer (logp_old) and
under the reference = base model with adapters off (logp_ref), which stage3_rl.py needs for PPO.
Both are log-probs of the distribution that sampled: softmax((logits + policy bias) / T), with
the adapter unmerged (llm.LLM.generate), at float32 precision.

[ours] The reward models never score prompts they trained on: RL prompts come from
R/data/rl.jsonl and the probe from R/data/probe.jsonl, parts of the training period that
data_prep.py removed from train.jsonl (the scorer, the ID models and ExpCTR-Aug train on
train.jsonl only). A reward model that memorised its training labels would give every
explanation of a prompt the same reward, and the advantage would vanish.

Three modes.
  Rollouts (--iter k): reads R/data/rl.jsonl, R/scorer/ (stage1_sft.py), R/policy/iter_{k-1}/
    (stage3_rl.py; none at k=1: a fresh LoRA equals the base), optionally --aug R/ctr/aug_* ;
    the prompts of iteration k are the k-th block of --prompts-per-iter in a seeded order of rl
    (fresh prompts each iteration until rl is used up). Writes R/rollouts/iter_k.jsonl, rows
    {uid, iid, label, prompt, explanation, prompt_ids, completion_ids, r_lc, r_ic, reward,
    logp_old, logp_ref, group, policy, phase, lambda_ic, temperature, model}.
  Probe (--probe TAG): the fixed held-out reward probe of policy TAG (base or iter_k): every
    prompt of R/data/probe.jsonl, K samples each, the same sampling seed for every policy, scored
    by r_LC (and r_IC with --aug) -> R/probe/TAG.jsonl rows {uid, iid, label, group, explanation,
    n_tokens, r_lc, r_ic, kl_ref, policy, model, seed, temperature}; kl_ref = sum over tokens of
    log pi - log pi_ref (a one-sample estimate of the sequence KL to the reference). Like with
    like across iterations: evaluate.py draws the learning curve from these files.
  Explanations (--split S1,S2 --tag T): greedy explanations of policy T (base = the untuned base
    model; iter_k = R/policy/iter_k/) for every sample of each split -> R/explanations/T/S.jsonl
    rows {uid, iid, label, prompt, explanation, n_tokens} + R/explanations/T/S.npy embeddings
    (row-aligned with R/data/S.jsonl) + R/explanations/T/meta.json.
All append rows to R/metrics.jsonl (stage "stage2_reward" / "probe").
Under torchrun (parallel.py) the rows run in chunks of --gen-batch, chunk c on rank c % N, each
seeded by its index: the files of N processes are those of one process.

    python stage2_reward.py --run-dir runs/x --split train,valid,test --tag base
    python stage2_reward.py --run-dir runs/x --probe base
    python stage2_reward.py --run-dir runs/x --iter 1 --lambda-ic 0
    python stage2_reward.py --run-dir runs/x --iter 3 --lambda-ic 0.5 --aug runs/x/ctr/aug_din_iter_2
"""
from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

import numpy as np
import torch

import common
import llm
import parallel
from common import ExpCTRError, RunPaths

SEED_STRIDE = 100003  # sampling seed of iteration k = seed * SEED_STRIDE + k (the probe uses k = 0)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", required=True, help="run folder (made by data_prep.py)")
    llm.add_model_args(p)  # --model, --dtype, --device, --threads, --attn
    p.add_argument("--seed", type=int, default=0, help="seed of prompt order and sampling")
    # rollout and probe modes
    p.add_argument("--iter", type=int, default=None, help="rollout mode: PPO iteration k (1-based)")
    p.add_argument("--probe", default=None, metavar="TAG",
                   help="probe mode: score policy TAG (base or iter_k) on R/data/probe.jsonl")
    p.add_argument("--prompts-per-iter", type=int, default=128,
                   help="RL prompts per iteration (a block of a seeded order of rl.jsonl) [ours]")
    p.add_argument("--k-samples", type=int, default=4, help="K sampled explanations per prompt [ours]")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature; the stored log-probs are of this distribution "
                        "(no top-k/top-p: PPO needs the log-probs of what sampled)")
    p.add_argument("--lambda-ic", type=float, default=0.0, help="weight of r_IC in the reward")
    p.add_argument("--aug", default=None, help="ExpCTR-Aug checkpoint folder (train_ctr.py "
                   "--text-emb ... --out-name aug_...); needed when --lambda-ic > 0")
    # explanation mode
    p.add_argument("--split", default=None, help="explanation mode: comma-separated splits")
    p.add_argument("--tag", default=None, help="explanation mode: base or iter_k")
    # all
    p.add_argument("--max-new-tokens", type=int, default=40, help="explanation length cap (tokens)")
    p.add_argument("--encoder", default=None, help="embedding model for explanations (default: the "
                   "base LLM, adapters off, mean-pooled last hidden state)")
    p.add_argument("--gen-batch", type=int, default=128,
                   help="sequences per generate() call; also the chunk of work: rollouts are seeded, "
                        "sampled and scored chunk by chunk, chunk c on rank c %% N under torchrun")
    p.add_argument("--fwd-batch", type=int, default=64, help="sequences per scoring forward pass")
    p.add_argument("--save-every", type=int, default=8,
                   help="explanation mode: checkpoint partial results every N rounds of "
                        "generate batches (one batch per process per round)")
    p.add_argument("--force", action="store_true", help="redo even if the output exists")
    a = p.parse_args(argv)
    if sum(x is not None for x in (a.iter, a.probe, a.split)) != 1:
        p.error("give one of --iter K (rollouts), --probe TAG (reward probe) or --split S --tag T "
                "(explanations)")
    if a.split is not None and not a.tag:
        p.error("--split needs --tag (base or iter_k)")
    if a.temperature <= 0:
        p.error("--temperature must be > 0")
    return a


# ---- algorithm: rewards ------------------------------------------------------------------
def label_logprob(p_click: np.ndarray, labels: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """log p(true label) from p(click); used for r_IC (r_LC comes straight from the 2-way kernel)."""
    p = np.clip(p_click, eps, 1 - eps)
    return np.where(labels == 1, np.log(p), np.log1p(-p))


def lc_reward(bundle: llm.LLM, prompts: list[str], expls: list[str], labels: list[int],
              batch: int, targets: list[str] | None = None) -> np.ndarray:
    """r_LC = log p_scorer(true label | prompt, explanation) (targets: the target as the scorer's
    question names it); one scorer pass (llm.scorer_logprobs), the K explanations of a prompt
    sharing its forward."""
    lp = bundle.scorer_logprobs(prompts, expls, targets or [None] * len(prompts), batch)
    return np.where(np.asarray(labels) == 1, lp[:, 0], lp[:, 1]).astype(np.float64)


@functools.lru_cache(maxsize=1)
def aug_model(aug_dir: str):
    """The ExpCTR-Aug checkpoint, loaded once per process (ic_reward runs once per chunk)."""
    import ctr_models
    return ctr_models.load_checkpoint(aug_dir)


def ic_reward(aug_dir: str, samples: list[dict], emb: np.ndarray) -> np.ndarray:
    """r_IC = log p_aug(true label | ID features, explanation embedding) (ExpCTR-Aug)."""
    pred = aug_model(aug_dir)
    if getattr(pred, "text_dim", None) != emb.shape[1]:
        raise ExpCTRError(f"--aug {aug_dir} expects text embeddings of size "
                          f"{getattr(pred, 'text_dim', None)}, the explanations give {emb.shape[1]}: "
                          f"train it on explanations of the same model/--encoder")
    p = np.asarray(pred.predict(samples, text_emb=emb), dtype=np.float64)
    return label_logprob(p, np.array([s["label"] for s in samples]))


def total_reward(r_lc: np.ndarray, r_ic: np.ndarray | None, lambda_ic: float) -> np.ndarray:
    """r = r_LC + lambda * r_IC (lambda = 0, or no ExpCTR-Aug yet, in Phase 1: r = r_LC)."""
    return r_lc + (lambda_ic * r_ic if r_ic is not None else 0.0)


def token_logprobs(bundle, adapter, prompt_ids, completion_ids, batch, temperature) -> list[list[float]]:
    """Per-token log-probs of each completion under `adapter` (None = the reference), of the
    sampling distribution at `temperature`; float32 values, stored unrounded. The K samples of a
    prompt share its forward pass (prefix KV reuse, llm.completion_logprobs_grouped)."""
    with bundle.use(adapter):
        lps = bundle.completion_logprobs_grouped(prompt_ids, completion_ids, batch, temperature)
    return [x.tolist() for x in lps]


def iteration_prompts(n: int, per_iter: int, k: int, seed: int) -> np.ndarray:
    """[ours] Indices into rl.jsonl of iteration k's prompts: the k-th block of per_iter in a
    seeded order of all n prompts (a fresh permutation each pass), so every prompt is used once
    before any is used twice."""
    per_iter = min(per_iter, n)
    start, order = (k - 1) * per_iter, []
    p = 0
    while len(order) < start + per_iter:
        order += np.random.default_rng([seed, p]).permutation(n).tolist()
        p += 1
    return np.sort(order[start:start + per_iter])


def chunk_seed(seed: int, c: int) -> int:
    """[ours] The sampling seed of chunk c (a --gen-batch block of rows): each chunk owns its
    random stream, so that N processes (chunk c on rank c % N) sample what one process samples."""
    return int(np.random.SeedSequence([seed, c]).generate_state(1)[0])


def generate(bundle, adapter, prompt_ids, args, greedy):
    """Generation in --gen-batch batches with `adapter` active and unmerged (the modules PPO
    trains); sampled mode also returns the generation-time log-probs of each token (CPU)."""
    comps, lps = [], []
    with bundle.use(adapter):
        for a in range(0, len(prompt_ids), args.gen_batch):
            res = bundle.generate(prompt_ids[a:a + args.gen_batch], greedy=greedy,
                                  temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                                  return_logprobs=not greedy)
            comps += res if greedy else res[0]
            lps += [] if greedy else [x.float().cpu() for x in res[1]]
    return comps if greedy else (comps, lps)


def sample_and_score(bundle, actor, samples, items, args, seed, desc, popt, world, logps=True):
    """K samples per prompt from `actor` (None = base), their rewards and log-probs; one dict of
    per-sample lists. The rows (K copies of a prompt next to each other) run in chunks of
    --gen-batch: sampled with the chunk's seed, then scored, all within the chunk (the same
    batches whatever the number of processes). `behaviour_gap` = max |log-prob as generation
    computed it - logp_old|: the sampling policy and the stored one are the same distribution
    up to float rounding. logps=False skips the two log-prob passes (logp_old, logp_ref and
    behaviour_gap are then None): the base policy's probe, whose KL to itself is 0 by definition."""
    prompts = [common.build_prompt(s, items, **popt) for s in samples]
    prompt_ids = [bundle.explainer_ids(p) for p in prompts]
    targets = [common.target_text(s, items) for s in samples]
    chunks = [list(range(a, min(len(samples), a + args.gen_batch)))
              for a in range(0, len(samples), args.gen_batch)]
    embedder = llm.make_embedder(bundle, args.encoder, args.fwd_batch) if args.aug else None

    def run(c):
        idx, t = chunks[c], [time.time()]
        pids = [prompt_ids[i] for i in idx]
        torch.manual_seed(chunk_seed(seed, c))
        comps, gen_lp = generate(bundle, actor, pids, args, greedy=False)
        t.append(time.time())
        expls = [bundle.decode(x) for x in comps]
        labels = [samples[i]["label"] for i in idx]
        r_lc = lc_reward(bundle, [prompts[i] for i in idx], expls, labels, args.fwd_batch,
                         [targets[i] for i in idx])
        t.append(time.time())
        r_ic = ic_reward(args.aug, [samples[i] for i in idx], embedder(expls)) if args.aug else None
        t.append(time.time())
        logp_old = logp_ref = None
        if logps:
            logp_old = token_logprobs(bundle, actor, pids, comps, args.fwd_batch, args.temperature)
        t.append(time.time())
        if logps:
            logp_ref = logp_old if actor is None else token_logprobs(
                bundle, None, pids, comps, args.fwd_batch, args.temperature)
        t.append(time.time())
        gap = None if logp_old is None else max(
            (float((g - torch.tensor(o)).abs().max()) for g, o in zip(gen_lp, logp_old) if len(o)),
            default=0.0)
        return {"comps": comps, "expls": expls, "r_lc": r_lc.tolist(),
                "r_ic": None if r_ic is None else r_ic.tolist(), "logp_old": logp_old,
                "logp_ref": logp_ref, "gap": gap,
                "timings": np.diff(t).tolist()}

    t0 = time.time()
    res = world.map_chunks(len(chunks), run, desc)
    res = [res[c] for c in range(len(chunks))]
    cat = lambda key: [x for r in res for x in r[key]]
    # seconds: per phase, summed over chunks and divided by the processes (per-process time)
    secs = np.sum([r["timings"] for r in res], 0) / world.size
    r_lc = np.asarray(cat("r_lc"), np.float64)
    r_ic = None if args.aug is None else np.asarray(cat("r_ic"), np.float64)
    return {"prompts": prompts, "prompt_ids": prompt_ids, "comps": cat("comps"),
            "expls": cat("expls"), "r_lc": r_lc, "r_ic": r_ic,
            "reward": total_reward(r_lc, r_ic, args.lambda_ic),
            "logp_old": cat("logp_old") if logps else None,
            "logp_ref": cat("logp_ref") if logps else None, "gen_s": float(secs[0]), "score_s": float(secs[1:].sum()),
            "wall_s": time.time() - t0,
            "timings": dict(zip(("generate", "r_lc", "r_ic", "logp_old", "logp_ref"), secs.tolist())),
            "behaviour_gap": max(r["gap"] for r in res) if logps else None}


# ---- plumbing: the three modes -----------------------------------------------------------
def attach_policy(bundle: llm.LLM, paths: RunPaths, tag: str, scorer: Path | None = None) -> str | None:
    """Attach the scorer (if given) and policy `tag` (base: none, the reference itself; iter_k:
    R/policy/iter_k as `explainer`); returns the explainer adapter name or None."""
    folder = llm.policy_folder(paths, tag)
    adapters = {"scorer": scorer} if scorer is not None else {}
    if folder is not None:
        adapters["explainer"] = folder
    if adapters:
        bundle.attach(adapters)
    return "explainer" if folder is not None else None


def explanations_mode(args, paths: RunPaths, model: str, world):
    splits = [s for s in args.split.split(",") if s]
    for s in splits:
        if s not in common.ALL_SPLITS:
            raise ExpCTRError(f"--split {s}: expected one of {', '.join(common.ALL_SPLITS)}")
    todo = [s for s in splits if args.force or not (paths.explanations(args.tag, s).exists()
                                                   and paths.embeddings(args.tag, s).exists())]
    for s in set(splits) - set(todo):
        print(f"[stage2] explanations/{args.tag}/{s} exists, skipped")
    if not todo:
        return
    meta_path = paths.root / "explanations" / args.tag / "meta.json"
    if meta_path.exists() and not args.force:
        meta = common.read_json(meta_path)
        if meta.get("model") != model or meta.get("encoder") != args.encoder:
            raise ExpCTRError(f"{meta_path}: made with --model {meta.get('model')} --encoder "
                              f"{meta.get('encoder')}, not {model} / {args.encoder}; use --force")
    items, popt = common.load_items(paths), common.prompt_options(paths)
    bundle = llm.from_args(model, args, world)
    adapter = attach_policy(bundle, paths, args.tag)
    embedder = llm.make_embedder(bundle, args.encoder, args.fwd_batch)
    for split in todo:
        rows = common.load_split(paths, split)
        prompts = [common.build_prompt(r, items, **popt) for r in rows]
        prompt_ids = [bundle.explainer_ids(p) for p in prompts]
        part = paths.root / "explanations" / args.tag / f".{split}.partial.jsonl"
        done = {}
        if part.exists() and not args.force:  # resume a run killed halfway
            done = {r["_i"]: r["ids"] for r in common.read_jsonl(part)
                    if r.get("model") == model and r["_i"] < len(rows)}
            world.main and print(f"[stage2] resuming {split}: {len(done)}/{len(rows)} done")

        def save(by_chunk):  # rank 0 keeps the partial file (every --save-every rounds)
            if world.main:
                rows_done = dict(done)
                for d in by_chunk.values():
                    rows_done.update(d)
                common.write_jsonl(part, ({"_i": i, "ids": c, "model": model}
                                          for i, c in sorted(rows_done.items())))
        # chunks = generate batches of similar length; the chunking never depends on the number
        # of processes (chunk c runs on rank c % N), so the file does not either
        chunks = llm.length_batches([len(x) for x in prompt_ids], args.gen_batch)
        todo_c = [c for c in chunks if not all(i in done for i in c)]

        def run(j):
            return dict(zip(todo_c[j], generate(bundle, adapter, [prompt_ids[i] for i in todo_c[j]],
                                                args, greedy=True)))
        common.set_seed(args.seed)
        t0 = time.time()
        out = dict(done)
        for part_out in world.map_chunks(len(todo_c), run, f"explain {args.tag}/{split}",
                                         on_round=save, every=args.save_every).values():
            out.update(part_out)
        comps = [out[i] for i in range(len(rows))]
        gen_s = time.time() - t0
        expls = [bundle.decode(c) for c in comps]
        emb = world.map_chunks(len(chunks), lambda c: embedder([expls[i] for i in chunks[c]]),
                               f"embed {args.tag}/{split}")
        emb = np.concatenate([emb[c] for c in range(len(chunks))])[np.argsort(np.concatenate(chunks))]
        if not world.main:
            continue
        common.save_npy(paths.embeddings(args.tag, split), emb.astype(np.float32))
        common.write_jsonl(paths.explanations(args.tag, split), (
            {"uid": r["uid"], "iid": r["iid"], "label": r["label"], "prompt": p,
             "explanation": e, "n_tokens": len(c)}
            for r, p, e, c in zip(rows, prompts, expls, comps)))
        common.write_json(meta_path, {"model": model, "encoder": args.encoder, "tag": args.tag,
                                      "max_new_tokens": args.max_new_tokens, "dim": int(emb.shape[1])})
        part.unlink(missing_ok=True)
        n_new = len(rows) - len(done)
        row = common.log_metrics(paths.metrics, "stage2_reward", mode="explanations", tag=args.tag,
                                 nproc=world.size,
                                 split=split, n=len(rows), model=model,
                                 expl_len=float(np.mean([len(c) for c in comps])),
                                 expl_per_s=round(n_new / max(gen_s, 1e-9), 3), seconds=round(gen_s, 1))
        print(f"[stage2] explanations/{args.tag}/{split}: {len(rows)} rows, "
              f"{row['expl_per_s']} expl/s, e.g. {expls[0]!r}")


def check_existing(out: Path, model: str) -> bool:
    """True (skip) when `out` exists and was made with `model`; an error when with another."""
    if not out.exists():
        return False
    first = common.read_jsonl(out)[:1]
    if first and first[0].get("model") != model:
        raise ExpCTRError(f"{out} was made with --model {first[0].get('model')}, not {model}: "
                          f"use --force or a fresh run folder")
    print(f"[stage2] {out} exists, skipped")
    return True


def reward_inputs(args, paths: RunPaths, split: str) -> tuple[Path, list[dict]]:
    """The scorer folder and the prompt split (rl or probe), with one-line errors."""
    scorer = paths.require(paths.scorer / "adapter_config.json",
                           f"python stage1_sft.py --run-dir {paths.root}").parent
    if args.lambda_ic > 0 and not args.aug:
        raise ExpCTRError("--lambda-ic > 0 needs --aug R/ctr/aug_... (made by train_ctr.py "
                          "--text-emb ... --out-name aug_...)")
    if args.aug:
        paths.require(Path(args.aug), "python train_ctr.py --run-dir R --model din --text-emb ... "
                      "--init-from R/ctr/din --out-name aug_...")
    if not common.has_split(paths, split):
        paths.require(paths.split(split), f"python data_prep.py --run-dir {paths.root} --force "
                                          f"(older run folders have no {split} split)")
    rows = common.load_split(paths, split)
    if not rows:
        raise ExpCTRError(f"{paths.split(split)}: no samples; rebuild the data with "
                          f"--{split}-frac > 0 (data_prep.py)")
    return scorer, rows


def rollout_mode(args, paths: RunPaths, model: str, world):
    k = args.iter
    out = paths.rollouts(k)
    if not args.force and check_existing(out, model):
        return
    if k < 1:
        raise ExpCTRError(f"--iter {k}: iterations start at 1")
    scorer, rl = reward_inputs(args, paths, "rl")
    items, popt = common.load_items(paths), common.prompt_options(paths)
    policy = common.policy_tag(k - 1)
    # ---- algorithm: the prompts of iteration k, K samples each, from the current explainer ----
    pick = iteration_prompts(len(rl), args.prompts_per_iter, k, args.seed)
    samples = [rl[i] for i in pick for _ in range(args.k_samples)]
    groups = [g for g in range(len(pick)) for _ in range(args.k_samples)]
    bundle = llm.from_args(model, args, world)
    actor = attach_policy(bundle, paths, policy, scorer)
    res = sample_and_score(bundle, actor, samples, items, args, args.seed * SEED_STRIDE + k,
                           f"rollouts iter {k}", popt, world)
    if not world.main:  # torchrun: rank 0 writes
        return
    phase = "ic" if args.lambda_ic > 0 else "lc"
    common.write_jsonl(out, (
        {"uid": s["uid"], "iid": s["iid"], "label": s["label"], "prompt": res["prompts"][i],
         "explanation": res["expls"][i], "prompt_ids": res["prompt_ids"][i],
         "completion_ids": res["comps"][i], "r_lc": float(res["r_lc"][i]),
         "r_ic": None if res["r_ic"] is None else float(res["r_ic"][i]),
         "reward": float(res["reward"][i]), "logp_old": res["logp_old"][i],
         "logp_ref": res["logp_ref"][i], "group": groups[i], "policy": policy, "phase": phase,
         "lambda_ic": args.lambda_ic, "temperature": args.temperature, "model": model}
        for i, s in enumerate(samples)))
    r_ic = res["r_ic"]
    row = common.log_metrics(
        paths.metrics, "stage2_reward", iter=k, policy=policy, phase=phase, model=model,
        nproc=world.size,
        n=len(samples), lambda_ic=args.lambda_ic, reward=float(np.mean(res["reward"])),
        r_lc=float(np.mean(res["r_lc"])), r_ic=None if r_ic is None else float(np.mean(r_ic)),
        expl_len=float(np.mean([len(c) for c in res["comps"]])),
        behaviour_gap=res["behaviour_gap"], expl_per_s=round(len(samples) / res["gen_s"], 3),
        gen_s=round(res["gen_s"], 1), score_s=round(res["score_s"], 1),
        seconds={k_: round(v, 2) for k_, v in res["timings"].items()})
    print(f"[stage2] iter {k}: {len(samples)} rollouts, reward {row['reward']:.4f} "
          f"(r_lc {row['r_lc']:.4f}), {row['expl_per_s']} expl/s, behaviour gap "
          f"{row['behaviour_gap']:.2e}; e.g. {res['expls'][0]!r}")


def probe_mode(args, paths: RunPaths, model: str, world):
    tag = args.probe
    out = paths.probe(tag)
    if not args.force and check_existing(out, model):
        return
    scorer, probe = reward_inputs(args, paths, "probe")
    items, popt = common.load_items(paths), common.prompt_options(paths)
    samples = [s for s in probe for _ in range(args.k_samples)]
    bundle = llm.from_args(model, args, world)
    actor = attach_policy(bundle, paths, tag, scorer)
    # ---- algorithm: the same prompts, K and seed for every policy (like with like) ----
    # the base policy is the reference: its KL is 0 and its log-prob passes are skipped [ours]
    res = sample_and_score(bundle, actor, samples, items, args, args.seed * SEED_STRIDE,
                           f"probe {tag}", popt, world, logps=actor is not None)
    if not world.main:  # torchrun: rank 0 writes
        return
    kl = [0.0] * len(samples) if actor is None else [
        float(np.sum(np.subtract(o, r), dtype=np.float64))
        for o, r in zip(res["logp_old"], res["logp_ref"])]
    common.write_jsonl(out, (
        {"uid": s["uid"], "iid": s["iid"], "label": s["label"], "group": i // args.k_samples,
         "explanation": res["expls"][i], "n_tokens": len(res["comps"][i]),
         "r_lc": float(res["r_lc"][i]), "r_ic": None if res["r_ic"] is None else float(res["r_ic"][i]),
         "kl_ref": kl[i], "policy": tag, "model": model, "seed": args.seed,
         "temperature": args.temperature}
        for i, s in enumerate(samples)))
    row = common.log_metrics(paths.metrics, "probe", tag=tag, model=model, n=len(samples),
                             nproc=world.size,
                             r_lc=float(np.mean(res["r_lc"])), kl_ref=float(np.mean(kl)),
                             behaviour_gap=res["behaviour_gap"], gen_s=round(res["gen_s"], 1),
                             score_s=round(res["score_s"], 1))
    print(f"[stage2] probe {tag}: {len(samples)} samples of {len(probe)} prompts, mean r_lc "
          f"{row['r_lc']:.4f}, KL to reference {row['kl_ref']:.4f} -> {out}")


def main(argv=None):
    args = parse_args(argv)
    paths = RunPaths(args.run_dir)
    model = llm.run_model(paths, args.model)
    world = parallel.init(args.device)  # torchrun: chunks shared out by rank, rank 0 writes
    if args.iter is not None:
        rollout_mode(args, paths, model, world)
    elif args.probe is not None:
        probe_mode(args, paths, model, world)
    else:
        explanations_mode(args, paths, model, world)
    parallel.close()


if __name__ == "__main__":
    common.cli(main)
