"""The LLM-CTR scorer of ExpCTR (PAPER_NOTES.md §2): LoRA SFT, TALLRec-style; and its predictions.

Paper part: "Explanation and LLM-CTR Alignment" needs an LLM that predicts the click from the
prompt and an explanation. [ours] The scorer is the base LLM with its own LoRA adapter `scorer`,
trained on common.build_scorer_prompt(prompt, explanation, target) -> " Yes" / " No";
p(click) = softmax over the Yes/No logits at the answer position (the kernel's log-softmax over
the two lm_head rows). Explanation dropout (default 0.3 [ours]) trains it to also predict with no
explanation, which gives the LLM-CTR-without-explanation baseline from the same adapter.
--scorer-view target [ours]: beside an explanation the scorer sees the target only, so the
explanation is its one channel for the user's preferences (what LC alignment can then improve).

Train mode (default):
  reads  R/data/{train,valid}.jsonl, R/data/items.jsonl,
         R/explanations/<tag>/{train,valid}.jsonl (tag base: the untuned explainer, stage2_reward.py)
  writes R/scorer/ (peft adapter, expctr.json, metrics.json {valid_auc_with_expl,
         valid_auc_no_expl, best_epoch, history, ...}); rows "stage1_sft" in R/metrics.jsonl.
  Early stopping on valid AUC with explanations; the best epoch's adapter is kept.
Predict mode (--predict TAGS --split SPLITS), step 8 of the schedule in run.sh:
  writes R/scorer/preds_<split>_<tag>.jsonl rows {uid, iid, label, p, p_shuffled}
  (tag none = no explanation, p_shuffled null; otherwise p_shuffled = [p under each of --shuffles
  seeded permutations of the explanations across the split's samples]). All variants of a prompt
  share its forward pass (prefix KV reuse).

Under torchrun (parallel.py): data-parallel SFT (each batch shared by the ranks, gradients
averaged); valid scoring, predictions and the frozen lower layers in chunks shared by rank.

    python stage1_sft.py --run-dir runs/x
    python stage1_sft.py --run-dir runs/x --predict none,base,iter_3 --split valid,test
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from tqdm import tqdm

import common
import llm
import parallel
from metrics import auc
from common import ExpCTRError, RunPaths


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", required=True, help="run folder (made by data_prep.py)")
    llm.add_model_args(p)  # --model, --dtype, --device, --threads, --attn
    p.add_argument("--seed", type=int, default=0, help="seed of shuffling, dropout, LoRA init")
    p.add_argument("--expl-tag", default="base",
                   help="explanations the scorer trains on: R/explanations/<tag>/ [ours: base]; "
                        "none = no explanations at all (the scorer alone, e.g. a learning curve)")
    p.add_argument("--epochs", type=int, default=3, help="maximum epochs")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (TALLRec: 1e-4)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--batch-size", type=int, default=16, help="training sequences per step")
    p.add_argument("--lora-r", type=int, default=llm.LORA_R, help="scorer LoRA rank (alpha = 2r)")
    p.add_argument("--lora-targets", default=",".join(llm.LORA_TARGETS),
                   help=f"comma-separated projections the scorer's LoRA adapts; 'all' = "
                        f"{','.join(llm.ALL_PROJ)} (TALLRec: q_proj,v_proj)")
    p.add_argument("--lora-layers", type=int, default=0,
                   help="LoRA in the top N decoder layers only (0 = all) [ours]: the frozen lower "
                        "layers run once per sample before training, and every step and every "
                        "valid evaluation runs the top N layers alone")
    p.add_argument("--answer-head", choices=["lm", "trained"], default="lm",
                   help="how the answer is read: lm = the lm_head's ' Yes'/' No' rows (TALLRec); "
                        "trained = a trainable [2, H] head initialised to those rows [ours]")
    p.add_argument("--answer-layer", type=int, default=0,
                   help="read the answer after decoder layer N (0 = the top layer, as TALLRec) "
                        "[ours]: the scorer runs layers [0, N) only, and --lora-layers are the top "
                        "of those; a linear probe on valid (scripts/scorer_layer_probe.py) shows "
                        "where a small model holds the click signal")
    p.add_argument("--scorer-view", choices=common.SCORER_VIEWS, default="full",
                   help="what the scorer reads beside an explanation: full = the whole prompt "
                        "(TALLRec + explanation); target = the target item only, so the user's "
                        "history reaches it through the explanation alone [ours; "
                        "common.build_scorer_prompt]. Without explanation it reads the full prompt")
    p.add_argument("--profile-echo", type=float, default=0.0,
                   help="share of training samples whose explanation is the prompt's own history "
                        "lines (common.history_lines; never the label) [ours; with --scorer-view "
                        "target]: teaches the scorer to read statements about the user's tastes, "
                        "which the untuned explainer seldom writes, so that r_LC can credit them "
                        "when PPO finds them; valid also logs valid_auc_profile_echo (the most an "
                        "explanation restating the history gives this scorer)")
    p.add_argument("--echo-subsets", type=float, default=0.0,
                   help="share of the --profile-echo texts that state a part of the profile only: "
                        "the counts of a random non-empty proper subset of the catalogue's genres, "
                        "drawn per sample without the label [ours; prompt style genres]: teaches "
                        "the scorer to read a statement about one or two genres, so that r_LC can "
                        "tell which genre an explanation names (scripts/reward_templates.py)")
    p.add_argument("--echo-from", choices=("catalogue", "target"), default="catalogue",
                   help="what an --echo-subsets text draws its genres from: catalogue = a proper "
                        "subset of all genres; target = a non-empty subset of the target's own "
                        "genres (size uniform in 1..its genre count), the statement an explainer "
                        "can fit in a short budget when the catalogue has many genres [ours]")
    p.add_argument("--select-on", choices=("with_expl", "last"), default="with_expl",
                   help="which epoch's adapter is kept: the best valid AUC with explanations "
                        "(early stopping, --patience), or the last epoch")
    p.add_argument("--head-lr", type=float, default=None,
                   help="learning rate of the trained answer head (default: --lr)")
    p.add_argument("--grad-checkpoint", action="store_true",
                   help="activation checkpointing: less memory, ~1 more forward of compute "
                        "(full-depth LoRA only; with --lora-layers the top layers run alone)")
    p.add_argument("--eval-every", type=int, default=0,
                   help="also score valid every N steps (learning-curve rows in metrics.jsonl; "
                        "0 = at epoch ends only)")
    p.add_argument("--expl-dropout", type=float, default=0.3,
                   help="probability of training an example without its explanation [ours]")
    p.add_argument("--max-train", type=int, default=None, help="use only the first N train rows")
    p.add_argument("--patience", type=int, default=1, help="early stop after N epochs in a row "
                   "without a better valid AUC (with explanations)")
    p.add_argument("--eval-batch", type=int, default=16, help="sequences per scoring forward pass")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping")
    p.add_argument("--lora-dropout", type=float, default=llm.LORA_DROPOUT,
                   help="dropout on the LoRA input during SFT (peft lora_dropout)")
    p.add_argument("--predict", default=None, help="predict mode: comma-separated tags "
                   "(none = no explanation, base, iter_k)")
    p.add_argument("--split", default="valid,test", help="predict mode: comma-separated splits")
    p.add_argument("--shuffle-seed", type=int, default=0, help="seed of the explanation permutations")
    p.add_argument("--shuffles", type=int, default=5, help="predict mode: permutations of the "
                   "explanations across the split's samples (the faithfulness baseline)")
    p.add_argument("--force", action="store_true", help="redo even if the output exists")
    return p.parse_args(argv)


# ---- algorithm: the scorer's loss and probabilities ----------------------------------------
def scorer_loss(answer_logp: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy over the 2-way (Yes/No) softmax: -log p(true answer).
    answer_logp [B,2] = log p(Yes), log p(No); labels [B] in {0,1} (1 = click = Yes)."""
    idx = (1 - labels).long()  # click -> column 0 (Yes)
    return -answer_logp.gather(1, idx[:, None]).squeeze(1).mean()


def scorer_inputs(prompts: list[str], variants: list[list[str | None]],
                  targets: list[str] | None) -> tuple[list, list, list]:
    """The flat scorer inputs of predict_p: input j = prompt j // V under variant j % V (V =
    len(variants)), as parallel lists of prompts, explanations and targets."""
    n, targets = len(prompts), targets or [None] * len(prompts)
    return ([p for p in prompts for _ in variants], [v[i] for i in range(n) for v in variants],
            [t for t in targets for _ in variants])


def predict_p(bundle: llm.LLM, prompts: list[str], variants: list[list[str | None]],
              batch: int, targets: list[str] | None = None) -> np.ndarray:
    """p(click) = exp(log p(Yes)) of each prompt under each variant of explanations ([v][i]:
    variant v's explanation of prompt i, None = no text) -> [n_variants, n]; targets[i] = the
    target as the question names it (common.target_text). One scorer pass (llm.scorer_logprobs)
    over all inputs at once: the reference the stages' predict_p_chunked is tested against."""
    lp = bundle.scorer_logprobs(*scorer_inputs(prompts, variants, targets), batch)
    return lp[:, 0].exp().numpy().astype(np.float64).reshape(len(prompts), len(variants)).T


def predict_p_chunked(world, bundle: llm.LLM, prompts: list[str], variants: list[list[str | None]],
                      batch: int, targets: list[str] | None = None) -> np.ndarray:
    """predict_p in chunks (chunk c on rank c % N under torchrun; the same chunks for any N, so
    the same numbers), gathered on every rank -> [n_variants, n]. A chunk holds whole groups of
    scorer inputs (llm_reuse.PrefixReuse.scorer_groups), about `batch` prompts' worth, so that
    inputs which share a forward (one explanation under every permutation that reads it) are
    never split across chunks."""
    n, V = len(prompts), len(variants)
    P, E, T = scorer_inputs(prompts, variants, targets)
    groups: dict = {}
    for j, key in enumerate(bundle.scorer_groups(P, E)):
        groups.setdefault(key, []).append(j)
    chunks, cur = [], []
    for members in groups.values():  # first-use order: deterministic
        cur += members
        if len(cur) >= batch * V:
            chunks.append(cur)
            cur = []
    chunks += [cur] if cur else []
    got = world.map_chunks(len(chunks), lambda c: bundle.scorer_logprobs(
        [P[j] for j in chunks[c]], [E[j] for j in chunks[c]], [T[j] for j in chunks[c]], batch), "score")
    p = np.zeros(n * V)
    for c, idx in enumerate(chunks):
        p[idx] = got[c][:, 0].exp().numpy().astype(np.float64)
    return p.reshape(n, V).T


def profile_echo(sample: dict, items: dict, popt: dict, keep: set[str] | None = None) -> str:
    """[ours] The --profile-echo text: the user's liked / disliked history as the prompt shows it,
    in the explanation's place (no label, no target verdict); keep: only these genres' counts."""
    return common.history_lines(sample, items, popt["style"], keep).replace("\n", " ")


def genre_subsets(n: int, genres: list[str], share: float, seed: int,
                  pools: list[list[str]] | None = None) -> list[set[str] | None]:
    """[ours] --echo-subsets: per sample, None (the whole profile) or, with probability `share`,
    a random non-empty proper subset of the catalogue's genres (size uniform in 1..G-1), or with
    pools (--echo-from target: pools[i] = sample i's target genres) a non-empty subset of pools[i]
    (size uniform in 1..len(pools[i])). Drawn from its own stream, so share 0 leaves every other
    draw of SFT as it was. Neither draw sees the label."""
    if share <= 0 or (pools is None and len(genres) < 2):
        return [None] * n
    rng = np.random.default_rng([seed, 5])
    out = []
    for i in range(n):
        pool, hi = (genres, len(genres) - 1) if pools is None else (pools[i], len(pools[i]))
        chosen = rng.random() < share  # drawn first, the subset only when chosen
        out.append(set(rng.choice(pool, rng.integers(1, hi + 1), replace=False).tolist())
                   if chosen and hi else None)
    return out


def echo_keep(rows: list[dict], items: dict, share: float, seed: int,
              of: str = "catalogue") -> list[set[str] | None]:
    """genre_subsets for the train rows: of = --echo-from (catalogue: the catalogue's genres;
    target: each row's own target genres)."""
    pools = [sorted(items[r["iid"]].get("genres", [])) for r in rows] if of == "target" else None
    return genre_subsets(len(rows), sorted({g for it in items.values() for g in it.get("genres", [])}),
                         share, seed, pools)


def train_texts(rows, ex, items, popt, u, dropout: float, echo: float,
                keep: list | None = None) -> list[str | None]:
    """What each training sample shows the scorer beside its prompt, from one uniform draw u[i]
    per sample: nothing (u < dropout: explanation dropout), the profile echo (u < dropout +
    echo; keep[i]: only those genres, genre_subsets), else the explainer's explanation."""
    keep = keep or [None] * len(rows)
    return [None if x < dropout else profile_echo(r, items, popt, k) if x < dropout + echo
            else e["explanation"] for r, e, x, k in zip(rows, ex, u, keep)]


# ---- plumbing: inputs ---------------------------------------------------------------------
def train(args, paths: RunPaths, model: str, world):
    if (paths.scorer / "metrics.json").exists() and not args.force:
        trained_on = common.read_json(paths.scorer / "expctr.json").get("model")
        if trained_on != model:
            raise ExpCTRError(f"{paths.scorer} was trained on --model {trained_on}, not {model}: "
                              f"use --force or a fresh run folder")
        print(f"[stage1] {paths.scorer} exists, skipped")
        return
    items, popt = common.load_items(paths), common.prompt_options(paths)
    tr_rows = common.load_split(paths, "train")
    va_rows = common.load_split(paths, "valid")
    if args.expl_tag == "none":  # the scorer alone (TALLRec): every sample without explanation
        tr_ex, va_ex = ([{"explanation": None}] * len(rows) for rows in (tr_rows, va_rows))
    else:
        tr_ex = common.load_explanations(paths, args.expl_tag, "train", tr_rows)
        va_ex = common.load_explanations(paths, args.expl_tag, "valid", va_rows)
    if args.max_train:
        tr_rows, tr_ex = tr_rows[:args.max_train], tr_ex[:args.max_train]
    common.set_seed(args.seed)
    bundle = llm.from_args(model, args, world)
    targets = llm.ALL_PROJ if args.lora_targets == "all" else tuple(args.lora_targets.split(","))
    bundle.attach({"scorer": None}, r=args.lora_r, targets=targets, top_layers=args.lora_layers,
                  answer_layer=args.answer_layer, scorer_view=args.scorer_view,
                  lora_dropout=args.lora_dropout)
    if args.answer_head == "trained":
        bundle.add_answer_head("scorer")
    bundle.activation_checkpointing(args.grad_checkpoint and not args.lora_layers)
    params = bundle.trainable("scorer")
    world.broadcast_params(params)  # torchrun: every rank starts from rank 0's adapter
    head = list(bundle.heads["scorer"].parameters()) if "scorer" in bundle.heads else []
    lora = [q for q in params if all(q is not h for h in head)]
    opt = torch.optim.AdamW([{"params": lora, "lr": args.lr},
                             {"params": head, "lr": args.head_lr or args.lr}],
                            weight_decay=args.weight_decay)
    rng = np.random.default_rng(args.seed)  # the same draws on every rank (batches, dropout)
    if world.rank:  # its own LoRA-dropout masks (rank 0 keeps the one-process stream)
        torch.manual_seed(args.seed * 1000 + world.rank)
    # [ours] explanation dropout drawn once: a sample is seen with or without its explanation in
    # every epoch, so that its frozen lower-layer states can be computed once (--lora-layers)
    if args.echo_subsets and popt["style"] != "genres":
        raise ExpCTRError(f"--echo-subsets needs prompt style 'genres' (data_prep.py --prompt-style), "
                          f"not {popt['style']!r}")
    keep = echo_keep(tr_rows, items, args.echo_subsets, args.seed, args.echo_from)
    tr_text = train_texts(tr_rows, tr_ex, items, popt, rng.random(len(tr_rows)),
                          args.expl_dropout, args.profile_echo, keep)
    tr_seqs = [bundle.scorer_ids(common.build_prompt(r, items, **popt), x, common.target_text(r, items))
               for r, x in zip(tr_rows, tr_text)]
    tr_labels = torch.tensor([r["label"] for r in tr_rows], device=bundle.device)
    va_prompts = [common.build_prompt(r, items, **popt) for r in va_rows]
    va_targets = [common.target_text(r, items) for r in va_rows]
    va_labels = [r["label"] for r in va_rows]
    # valid variants: the explainer's text, none, and (--profile-echo) the profile statement
    va_variants = [[e["explanation"] for e in va_ex], [None] * len(va_rows)] + (
        [[profile_echo(r, items, popt) for r in va_rows]] if args.profile_echo else [])
    n_top, t0 = args.lora_layers, time.time()
    if n_top:  # the frozen lower layers, once for every train and valid sequence
        va_seqs = [bundle.scorer_ids(p, x, t) for expl in va_variants
                   for p, x, t in zip(va_prompts, expl, va_targets)]
        with bundle.use("scorer"):
            tr_states = llm.lower_states_chunked(world, bundle, tr_seqs, n_top, args.eval_batch,
                                             "lower layers, train")
            va_states = llm.lower_states_chunked(world, bundle, va_seqs, n_top, args.eval_batch,
                                             "lower layers, valid")
    lower_s = time.time() - t0

    def forward(idx):  # [B,2] answer log-probs of train samples idx, scorer active
        if n_top:
            return bundle.upper_answer_logprobs([tr_states[i] for i in idx], n_top)
        return bundle.answer_logprobs([tr_seqs[i] for i in idx])

    def evaluate():
        bundle.model.eval()
        if n_top:
            starts = range(0, len(va_states), args.eval_batch)

            def upper(c):
                with bundle.use("scorer"), torch.inference_mode():
                    x = va_states[starts[c]:starts[c] + args.eval_batch]
                    return bundle.upper_answer_logprobs(x, n_top)[:, 0].exp().float().cpu()
            got = world.map_chunks(len(starts), upper, "valid")
            P = torch.cat([got[c] for c in range(len(starts))]).numpy().reshape(
                len(va_variants), len(va_rows))
        else:
            P = predict_p_chunked(world, bundle, va_prompts, va_variants, args.eval_batch, va_targets)
        return [auc(va_labels, p) for p in P]  # with explanation, without[, profile echo]

    def valid_row(aucs):
        return dict(valid_auc_with_expl=aucs[0], valid_auc_no_expl=aucs[1],
                    **({"valid_auc_profile_echo": aucs[2]} if len(aucs) > 2 else {}))

    stopper, best_state, history, step = common.EarlyStopping(args.patience), None, [], 0
    log = common.log_metrics if world.main else lambda path, stage, **row: dict(stage=stage, **row)
    for epoch in range(1, args.epochs + 1):
        # ---- algorithm: one epoch of SFT with explanation dropout ----
        bundle.model.train()
        order = rng.permutation(len(tr_rows))
        losses, n_tok, t0 = [], 0, time.time()
        bar = tqdm(range(0, len(order), args.batch_size), desc=f"sft epoch {epoch}", unit=" step")
        for s in bar:
            idx = world.share(order[s:s + args.batch_size])  # torchrun: this rank's part
            opt.zero_grad(set_to_none=True)
            loss = torch.zeros(())
            if len(idx):
                with bundle.use("scorer"):
                    loss = scorer_loss(forward(idx), tr_labels[idx])
                loss.backward()
            world.average_gradients(params, len(idx))  # = the whole batch's gradient
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            opt.step()
            losses.append(world.weighted_mean({"loss": loss.item()}, len(idx))["loss"])
            n_tok += sum(len(tr_seqs[i]) for i in idx)
            bar.set_postfix(loss=f"{np.mean(losses):.4f}")
            step += 1
            if args.eval_every and step % args.eval_every == 0 and s + args.batch_size < len(order):
                curve = valid_row(evaluate())  # a learning-curve point (not a stopping candidate)
                log(paths.metrics, "stage1_sft_curve", step=step, epoch=epoch,
                    samples=step * args.batch_size, train_loss=float(np.mean(losses)), **curve,
                    model=model)
                bundle.model.train()
        train_s = time.time() - t0
        n_tok = sum(world.gather(n_tok))
        aucs = evaluate()
        auc_e, auc_n = aucs[:2]
        row = log(paths.metrics, "stage1_sft", epoch=epoch, step=step,
                  samples=step * args.batch_size, loss=float(np.mean(losses)), **valid_row(aucs),
                  tokens_per_s=round(n_tok / train_s, 1), seconds=round(train_s, 1), model=model,
                  nproc=world.size)
        history.append(row)
        if world.main:
            print(f"[stage1] epoch {epoch}: loss {row['loss']:.4f}, valid AUC with expl {auc_e}, "
                  f"without {auc_n}, {row['tokens_per_s']} train tokens/s")
        # --select-on last, or a single-class valid: keep the last epoch
        score = epoch if args.select_on == "last" or math.isnan(auc_e) else auc_e
        if stopper.step(score):
            best_state = [q.detach().clone() for q in params]
            best_row = row
        elif stopper.stop:
            break
    # ---- plumbing: keep the best epoch, save adapter + metrics atomically ----
    with torch.no_grad():
        for q, v in zip(params, best_state):
            q.copy_(v)
    metrics = {"valid_auc_with_expl": best_row["valid_auc_with_expl"],
               "valid_auc_no_expl": best_row["valid_auc_no_expl"], "best_epoch": best_row["epoch"],
               "valid_auc_profile_echo": best_row.get("valid_auc_profile_echo"),
               "profile_echo": args.profile_echo, "echo_subsets": args.echo_subsets,
               "echo_from": args.echo_from,
               "epochs_run": len(history), "n_train": len(tr_rows), "n_valid": len(va_rows),
               "expl_tag": args.expl_tag, "expl_dropout": args.expl_dropout, "lr": args.lr,
               "lora": {"r": args.lora_r, "targets": list(targets), "top_layers": args.lora_layers},
               "answer_head": args.answer_head, "head_lr": args.head_lr or args.lr,
               "answer_layer": args.answer_layer or bundle.n_layers, "scorer_view": args.scorer_view,
               "lower_layers_seconds": round(lower_s, 1),
               "model": model, "history": history}
    if not world.main:  # torchrun: rank 0 writes
        return
    bundle.save_adapter("scorer", paths.scorer, files={"metrics.json": metrics}, expl_tag=args.expl_tag)
    print(f"[stage1] scorer -> {paths.scorer} (best epoch {best_row['epoch']})")


def predict(args, paths: RunPaths, model: str, world):
    tags = [t for t in args.predict.split(",") if t]
    splits = [s for s in args.split.split(",") if s]
    out = lambda s, t: paths.scorer / f"preds_{s}_{t}.jsonl"
    todo = [(s, t) for s in splits for t in tags if args.force or not out(s, t).exists()]
    if not todo:
        print("[stage1] all predictions exist, skipped")
        return
    paths.require(paths.scorer / "adapter_config.json", f"python stage1_sft.py --run-dir {paths.root}")
    items, popt = common.load_items(paths), common.prompt_options(paths)
    bundle = llm.from_args(model, args, world)
    bundle.attach({"scorer": paths.scorer})
    for split in splits:
        tags_s = [t for s, t in todo if s == split]
        if not tags_s:
            continue
        rows = common.load_split(paths, split)
        prompts = [common.build_prompt(r, items, **popt) for r in rows]
        labels = [r["label"] for r in rows]
        # ---- every variant of a prompt in one grouped pass: per tag the explanations and
        # --shuffles permutations of them (the faithfulness baseline), or no text for "none"
        variants, owner = [], []
        for tag in tags_s:
            if tag == "none":
                variants.append([None] * len(rows))
                owner.append((tag, None))
                continue
            expls = [e["explanation"] for e in common.load_explanations(paths, tag, split, rows)]
            variants.append(expls)
            owner.append((tag, None))
            for j in range(args.shuffles):
                perm = np.random.default_rng([args.shuffle_seed, j]).permutation(len(rows))
                variants.append([expls[q] for q in perm])
                owner.append((tag, j))
        t0 = time.time()
        P = predict_p_chunked(world, bundle, prompts, variants, args.eval_batch,
                              [common.target_text(r, items) for r in rows])
        for tag in tags_s if world.main else ():  # torchrun: rank 0 writes
            p = P[owner.index((tag, None))]
            p_sh = [P[v] for v, (t, j) in enumerate(owner) if t == tag and j is not None]
            common.write_jsonl(out(split, tag), (
                {"uid": r["uid"], "iid": r["iid"], "label": r["label"], "p": float(p[i]),
                 "p_shuffled": [float(x[i]) for x in p_sh] if p_sh else None}
                for i, r in enumerate(rows)))
            a = auc(labels, p)
            a_sh = float(np.mean([auc(labels, x) for x in p_sh])) if p_sh else None
            common.log_metrics(paths.metrics, "stage1_sft", mode="predict", split=split, tag=tag,
                               nproc=world.size,
                               auc=a, auc_shuffled_mean=a_sh, n_shuffles=len(p_sh), n=len(rows),
                               seconds=round((time.time() - t0) / len(tags_s), 1))
            print(f"[stage1] preds_{split}_{tag}: AUC {a}" +
                  (f", shuffled (mean of {len(p_sh)}) {a_sh}" if p_sh else ""))


def main(argv=None):
    args = parse_args(argv)
    paths = RunPaths(args.run_dir)
    model = llm.run_model(paths, args.model)
    world = parallel.init(args.device)  # torchrun: data-parallel SFT, chunked scoring
    if args.predict:
        predict(args, paths, model, world)
    else:
        train(args, paths, model, world)
    parallel.close()


if __name__ == "__main__":
    common.cli(main)
