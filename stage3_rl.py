"""PPO update of the ExpCTR explainer on one rollout file (PAPER_NOTES.md §4).

Paper part: "RL with LoRA" — the explainer is tuned by PPO with the LC / IC alignment rewards, in
Phase 1 (LC alignment) and Phase 3 (IC alignment) of the schedule; the rollout rows say which
(their `phase` and `lambda_ic`).
[ours] PPO-clip (epsilon 0.2) on sequence-level rewards: K sampled explanations per prompt,
leave-one-out group advantage (RLOO: reward minus the mean of the other K-1 samples of the same
prompt, as in TRL's RLOOTrainer; no value head), normalised by the batch std; a per-token KL
penalty to the reference policy (base model with adapters off, k3 estimator, coefficient beta);
a few epochs of minibatches; gradient clipping; AdamW without weight decay (decay would pull the
LoRA toward the reference on its own). A group whose rewards are all equal gets zero advantage
(never NaN). The policy is kept in eval mode (no LoRA dropout) so the first step's ratio is 1 up
to float rounding (logged as ratio_first_step) [ours]. Log-probs are of the distribution that
sampled (the rollout rows' temperature, special tokens masked), see llm.LLM.generate.
[ours] --lora-layers N: the LoRA adapts the top N decoder layers only; the lower layers' output is
then the same for the policy, the old policy and the reference, so each iteration computes it once
and every PPO epoch runs the top N layers alone (scripts/bench_ppo_update.py; the same update as
through the whole model, tests/test_rl_loop.py).

Reads   R/rollouts/iter_k.jsonl (stage2_reward.py --iter k), R/policy/iter_{k-1}/ (k>1; at k=1 a
        fresh LoRA, which equals the base since LoRA B=0).
Writes  R/policy/iter_k/ (peft adapter `explainer`, PeftModel.from_pretrained-loadable) and one
        row {"stage": "stage3_rl", iter, phase, reward, r_lc, r_ic, kl, clip_frac, entropy,
        ratio_first_step, expl_len, tokens_per_s, ...} in R/metrics.jsonl. reward/r_lc/r_ic are
        means over this iteration's own prompts (a training statistic: each iteration draws other
        prompts, so they are not a learning curve; the reward probe is, see stage2_reward.py).

Under torchrun (parallel.py): each minibatch shared by the ranks, gradients averaged (the
update of one process with the whole minibatch); rank 0 writes.

    python stage3_rl.py --run-dir runs/x --iter 1
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from tqdm import tqdm

import common
import llm
import parallel
from common import ExpCTRError, RunPaths


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", required=True, help="run folder")
    p.add_argument("--iter", type=int, required=True, help="PPO iteration k (reads rollouts/iter_k)")
    llm.add_model_args(p)  # --model, --dtype, --device, --threads, --attn
    p.add_argument("--seed", type=int, default=0, help="seed of minibatch order and fresh LoRA init")
    p.add_argument("--lr", type=float, default=5e-5,
                   help="AdamW learning rate of the PPO step [ours: below the SFT 1e-4]")
    p.add_argument("--clip-eps", type=float, default=0.2, help="PPO clipping epsilon")
    p.add_argument("--kl-beta", type=float, default=0.05, help="per-token KL penalty coefficient [ours]")
    p.add_argument("--ppo-epochs", type=int, default=2, help="passes over the rollout file [ours]")
    p.add_argument("--minibatch", type=int, default=32, help="sequences per optimizer step [ours]")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay of the LoRA "
                   "[ours: 0; a decay pulls the policy toward the reference besides the KL term]")
    p.add_argument("--lora-layers", type=int, default=0,
                   help="the fresh LoRA of iteration 1 adapts the top N decoder layers only (0 = "
                        "all) [ours]: each iteration then runs the frozen lower layers once over "
                        "its rollouts, and every PPO epoch runs the top N alone (later iterations "
                        "keep the layers of the adapter they load)")
    p.add_argument("--lora-targets", default=",".join(llm.LORA_TARGETS),
                   help=f"projections of the fresh LoRA of iteration 1; 'all' = {','.join(llm.ALL_PROJ)}")
    p.add_argument("--grad-checkpoint", action="store_true",
                   help="activation checkpointing: less memory, ~1 more forward of compute")
    p.add_argument("--adv-norm", choices=ADV_NORMS, default="batch",
                   help="scale of the RLOO advantages: batch (divide by their std over the batch), "
                        "group (by each prompt group's own std, as GRPO does: every prompt weighs "
                        "the same whatever its label [ours]), none")
    p.add_argument("--force", action="store_true", help="redo even if policy/iter_k exists")
    return p.parse_args(argv)


# ---- algorithm: the pure math (tests call these on hand-made numbers) ----------------------
ADV_NORMS = ("batch", "group", "none")
GROUP_STD_FLOOR = 1e-3  # [ours] nats: below it a group's rewards differ by rounding, not by text


def group_advantages(rewards, groups, norm: str = "batch", eps: float = 1e-8) -> np.ndarray:
    """RLOO advantage (REINFORCE leave-one-out, Ahmadian et al. 2024; TRL RLOOTrainer):
    A_i = r_i - mean_{j != i, same group} r_j, then divided by the batch std (norm "batch"), by
    its own group's std (norm "group", GRPO's scaling, Shao et al. 2024), or not at all. A
    group whose rewards are all equal (or a group of one) gets exactly 0.
    [ours] Why "group" exists: r_LC = log P(truth) of a scorer that under-predicts clicks
    varies ~2.6x more within the groups of clicked targets than within the others for the same
    spread of the scorer's logit (the planted world, seed 1: 0.360 vs 0.137). Scaled by the batch
    std, those groups dominate the gradient, which then pushes every explanation towards raising
    P(Yes), whoever the user is (README, "The planted world")."""
    if norm not in ADV_NORMS:
        raise ExpCTRError(f"advantage norm {norm!r}: expected one of {', '.join(ADV_NORMS)}")
    r = np.asarray(rewards, dtype=np.float64)
    g = np.asarray(groups)
    adv = np.zeros_like(r)
    for gid in np.unique(g):
        idx = np.flatnonzero(g == gid)
        k = len(idx)
        if k < 2 or np.ptp(r[idx]) < 1e-12:
            continue
        others_mean = (r[idx].sum() - r[idx]) / (k - 1)
        adv[idx] = r[idx] - others_mean
        if norm == "group":  # a group spread less than scoring noise (bf16) carries no signal
            sd = adv[idx].std()
            adv[idx] = adv[idx] / sd if sd > GROUP_STD_FLOOR else 0.0
    if norm == "batch":
        std = adv.std()
        adv = adv / (std + eps) if std > 1e-12 else np.zeros_like(adv)
    return adv


def k3_kl(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || pi_ref): exp(d) - d - 1 with d = logp_ref - logp;
    >= 0, and exactly 0 where the policy equals the reference."""
    d = logp_ref - logp
    return torch.exp(d) - d - 1


def ppo_loss(logp, logp_old, logp_ref, adv, mask, clip_eps: float = 0.2, kl_beta: float = 0.0):
    """PPO-clip surrogate + beta * k3 KL, tokens averaged per sequence, then over the batch.
    logp/logp_old/logp_ref/mask: [B, L]; adv: [B] (sequence-level, shared by its tokens).
    Padded positions (mask False) never reach the arithmetic: whatever they hold changes neither
    the loss nor the gradient. Returns (loss, stats dict of floats)."""
    keep = mask.bool()
    logp = torch.where(keep, logp, torch.zeros((), dtype=logp.dtype, device=logp.device))
    logp_old = torch.where(keep, logp_old, logp.detach())
    logp_ref = torch.where(keep, logp_ref, logp.detach())
    mask = keep.to(logp.dtype)
    ratio = torch.exp(logp - logp_old)
    a = adv[:, None]
    pg = torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps))
    kl = k3_kl(logp, logp_ref)
    per_tok = pg + kl_beta * kl
    n = mask.sum(1).clamp(min=1)
    loss = ((per_tok * mask).sum(1) / n).mean()
    with torch.no_grad():
        clipped = ((ratio - 1).abs() > clip_eps).to(logp.dtype)
        stats = {"pg_loss": float(((pg * mask).sum(1) / n).mean()),
                 "kl": float(((kl * mask).sum(1) / n).mean()),
                 "clip_frac": float((clipped * mask).sum() / mask.sum().clamp(min=1)),
                 "ratio": float((ratio * mask).sum() / mask.sum().clamp(min=1)),
                 "ratio_max_dev": float(((ratio - 1).abs() * mask).max()) if mask.any() else 0.0}
    return loss, stats


STAT_KEYS = ("pg_loss", "kl", "clip_frac", "ratio", "ratio_max_dev", "loss")  # ppo_loss + loss


def pad(seqs: list, value: float = 0.0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """List of 1-D tensors / lists -> right-padded [B, L] float tensor and its mask."""
    L = max(len(s) for s in seqs)
    out = torch.full((len(seqs), L), value, dtype=torch.float32, device=device)
    mask = torch.zeros((len(seqs), L), dtype=torch.bool, device=device)
    for i, s in enumerate(seqs):
        t = s if torch.is_tensor(s) else torch.tensor(s, dtype=torch.float32)
        out[i, :len(s)] = t.to(device=device, dtype=torch.float32)
        mask[i, :len(s)] = True
    return out, mask


# ---- plumbing: inputs, the update loop, outputs ------------------------------------------
def load_rollouts(paths: RunPaths, k: int, model: str) -> list[dict]:
    f = paths.require(paths.rollouts(k), f"python stage2_reward.py --run-dir {paths.root} --iter {k}")
    rows = common.read_jsonl(f)
    want_policy = common.policy_tag(k - 1)
    need = ("prompt_ids", "completion_ids", "logp_old", "logp_ref", "reward", "group", "phase",
            "temperature")
    for i, r in enumerate(rows, 1):
        for key in need:
            if key not in r:
                raise ExpCTRError(f"{f}:{i}: missing field '{key}'")
        if r.get("model") != model:
            raise ExpCTRError(f"{f}:{i}: sampled with --model {r.get('model')}, not {model}: rerun "
                              f"`python stage2_reward.py --run-dir {paths.root} --iter {k} --force` "
                              f"or pass --model {r.get('model')}")
        if r.get("policy") != want_policy:
            raise ExpCTRError(f"{f}:{i}: sampled by policy {r.get('policy')}, but iteration {k} updates "
                              f"{want_policy}: rerun `python stage2_reward.py --run-dir {paths.root} "
                              f"--iter {k} --force`")
        if len(r["logp_old"]) != len(r["completion_ids"]) or len(r["logp_ref"]) != len(r["completion_ids"]):
            raise ExpCTRError(f"{f}:{i}: logp_old/logp_ref and completion_ids differ in length")
        for key in ("phase", "temperature"):
            if r[key] != rows[0][key]:
                raise ExpCTRError(f"{f}:{i}: field '{key}' is {r[key]!r}, line 1 has "
                                  f"{rows[0][key]!r}: one rollout file is one phase and temperature")
    if not rows:
        raise ExpCTRError(f"{f}: no rollouts")
    return rows


def main(argv=None):
    args = parse_args(argv)
    paths = RunPaths(args.run_dir)
    model = llm.run_model(paths, args.model)
    k = args.iter
    if (paths.policy(k) / "adapter_config.json").exists() and not args.force:
        print(f"[stage3] {paths.policy(k)} exists, skipped")
        return
    rows = load_rollouts(paths, k, model)
    world = parallel.init(args.device)  # torchrun: each minibatch shared out, gradients averaged
    common.set_seed(args.seed + k)
    bundle = llm.from_args(model, args, world)
    targets = llm.ALL_PROJ if args.lora_targets == "all" else tuple(args.lora_targets.split(","))
    bundle.attach({"explainer": llm.policy_folder(paths, common.policy_tag(k - 1))},
                  targets=targets, top_layers=args.lora_layers)  # a saved adapter keeps its own
    params = bundle.trainable("explainer")
    world.broadcast_params(params)
    bundle.model.eval()  # [ours] no LoRA dropout: ratio == 1 before the first step
    bundle.activation_checkpointing(args.grad_checkpoint)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)

    rewards = np.array([r["reward"] for r in rows])
    groups = [r["group"] for r in rows]
    adv_all = group_advantages(rewards, groups, args.adv_norm)
    # the size of the learning signal before normalisation: how much the K rewards of a prompt
    # differ (a scorer that ignores explanations gives ~0 here, and normalising only scales noise)
    raw_adv = group_advantages(rewards, groups, "none")
    within_std = [float(np.std(rewards[np.asarray(groups) == g])) for g in sorted(set(groups))]
    # the same spread by the group's label: a miscalibrated scorer's r_LC spreads wider for the
    # label it under-predicts (why --adv-norm group exists); the label never reaches the policy
    label_of = {r["group"]: r.get("label") for r in rows}
    by_label = {y: [s for g, s in zip(sorted(set(groups)), within_std) if label_of[g] == y] for y in (0, 1)}
    within_by_label = {y: float(np.mean(v)) if v else None for y, v in by_label.items()}
    phase, temperature = rows[0]["phase"], rows[0]["temperature"]
    rng = np.random.default_rng([args.seed, k])
    stats, ents, n_tok, t0 = [], [], 0, time.time()
    steps = [(e, s) for e in range(args.ppo_epochs) for s in range(0, len(rows), args.minibatch)]
    order = None
    with bundle.use("explainer"):
        # [ours] LoRA in the top n_top layers only: the lower layers' output is the same for the
        # policy, its old self and the reference, so it is computed once for every PPO epoch
        n_top = bundle.top_lora_layers("explainer")
        states = llm.lower_states_chunked(
            world, bundle, [r["prompt_ids"] + r["completion_ids"] for r in rows], n_top,
            args.minibatch, "lower layers") if n_top else None
        for e, s in tqdm(steps, desc=f"ppo iter {k}", unit=" step"):
            if s == 0:
                order = rng.permutation(len(rows))
            pick = world.share(order[s:s + args.minibatch])  # torchrun: this rank's part
            mb = [rows[i] for i in pick]
            opt.zero_grad(set_to_none=True)
            st, ent = dict.fromkeys(STAT_KEYS, 0.0), 0.0
            if mb:
                # ---- algorithm: one PPO minibatch step ----
                if n_top:
                    new, ents_mb = bundle.upper_completion_logprobs(
                        [states[i] for i in pick], [r["completion_ids"] for r in mb], n_top,
                        entropy=True, temperature=temperature)
                else:
                    new, ents_mb = bundle.completion_logprobs([r["prompt_ids"] for r in mb],
                                                              [r["completion_ids"] for r in mb],
                                                              entropy=True, temperature=temperature)
                logp = torch.nn.utils.rnn.pad_sequence([x.float() for x in new], batch_first=True)
                old, mask = pad([r["logp_old"] for r in mb], device=bundle.device)
                ref, _ = pad([r["logp_ref"] for r in mb], device=bundle.device)
                adv = torch.tensor(adv_all[pick], dtype=torch.float32, device=bundle.device)
                loss, st = ppo_loss(logp, old, ref, adv, mask, args.clip_eps, args.kl_beta)
                loss.backward()
                st["loss"] = loss.item()
                ent = float(torch.cat(ents_mb).detach().float().mean())
            # ---- plumbing: the whole minibatch's gradient and statistics over the ranks ----
            world.average_gradients(params, len(mb))
            st["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm))
            opt.step()
            dev_max = max(world.gather(st.pop("ratio_max_dev")))
            st = dict(world.weighted_mean(dict(st, entropy=ent), len(mb)), ratio_max_dev=dev_max,
                      grad_norm=st["grad_norm"])
            ents.append(st.pop("entropy"))
            stats.append(st)
            n_tok += sum(len(r["prompt_ids"]) + len(r["completion_ids"]) for r in mb)
    n_tok = sum(world.gather(n_tok))
    secs = time.time() - t0
    if not world.main:  # torchrun: rank 0 writes
        parallel.close()
        return
    mean = lambda key: float(np.mean([s[key] for s in stats]))
    r_ic = [r["r_ic"] for r in rows if r.get("r_ic") is not None]
    row = common.log_metrics(
        paths.metrics, "stage3_rl", iter=k, phase=phase, model=model, n=len(rows),
        nproc=world.size,
        reward=float(rewards.mean()), r_lc=float(np.mean([r["r_lc"] for r in rows])),
        r_ic=float(np.mean(r_ic)) if r_ic else None, reward_std_within_group=float(np.mean(within_std)),
        reward_std_within_clicked=within_by_label[1], reward_std_within_unclicked=within_by_label[0],
        adv_norm=args.adv_norm,
        reward_std_all=float(rewards.std()), adv_abs_mean_raw=float(np.abs(raw_adv).mean()),
        kl=mean("kl"), clip_frac=mean("clip_frac"),
        entropy=float(np.mean(ents)), expl_len=float(np.mean([len(r["completion_ids"]) for r in rows])),
        loss=mean("loss"), pg_loss=mean("pg_loss"), grad_norm=mean("grad_norm"),
        kl_last=stats[-1]["kl"], clip_frac_last=stats[-1]["clip_frac"],
        ratio_first_step=stats[0]["ratio"], ratio_first_step_max_dev=stats[0]["ratio_max_dev"],
        weight_decay=args.weight_decay, temperature=temperature,
        tokens_per_s=round(n_tok / secs, 1), seconds=round(secs, 1), lr=args.lr, kl_beta=args.kl_beta,
        lora_top_layers=n_top)
    bundle.save_adapter("explainer", paths.policy(k), iter=k, rollouts=str(paths.rollouts(k)))
    print(f"[stage3] iter {k} ({phase}): reward {row['reward']:.4f}, KL {row['kl']:.5f}, clip "
          f"{row['clip_frac']:.3f}, entropy {row['entropy']:.3f}, {row['tokens_per_s']} tokens/s "
          f"-> {paths.policy(k)}")
    parallel.close()


if __name__ == "__main__":
    common.cli(main)
