"""The RL loop is correct: the policy that samples is the policy whose log-probs PPO stores and
trains (bf16 included), those log-probs are of the distribution actually sampled, rewards are
computed on prompts no reward model trained on, the learning curve compares like with like, and
the PPO pieces fail when their math is wrong. Tiny random model, synthetic data, CPU."""
import argparse
import math
import shutil

import numpy as np
import pytest
import torch

import common
import data_prep
import evaluate
import llm
import stage2_reward
import stage3_rl
from common import RunPaths
from conftest import copy_run

ROLL = ["--model", "tiny", "--dtype", "float32", "--max-new-tokens", "6", "--prompts-per-iter", "3",
        "--k-samples", "2", "--gen-batch", "4", "--fwd-batch", "4"]
PPO = ["--model", "tiny", "--dtype", "float32", "--minibatch", "3", "--ppo-epochs", "1"]


def prompts_of(bundle, n):
    base = {"uid": "1", "label": 0, "ts": 0, "hist": [["2", 1], ["3", 0], ["5", 1]]}
    return [bundle.explainer_ids(common.build_prompt(dict(base, iid=str(i)), {})) for i in range(n)]


def set_lora_b(bundle, name, std, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in bundle.model.named_parameters():
            if f"lora_B.{name}" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)


# ---- 1. the generating policy is the trained policy, in bf16 too ---------------------------------
@pytest.fixture(scope="module")
def bf16_bundle():
    """bf16 base weights + an explainer LoRA with B of std 3e-3: an update of ~1e-3 per weight,
    below half a bf16 ulp of most weights (merging it into the bf16 weights would lose most of it)
    but moving the log-probs by ~0.07 nats per token on average."""
    b = llm.LLM("tiny", "bfloat16")
    b.attach({"explainer": None})
    set_lora_b(b, "explainer", 3e-3)
    return b


def test_bf16_sampling_path_logprobs_equal_the_trained_forward(bf16_bundle):
    b = bf16_bundle
    prompts = prompts_of(b, 16)
    args = argparse.Namespace(gen_batch=8, temperature=0.8, max_new_tokens=12, save_every=100)
    torch.manual_seed(0)
    comps, gen_lp = stage2_reward.generate(b, "explainer", prompts, args, False)
    with torch.no_grad(), b.use("explainer"):
        full = b.completion_logprobs(prompts, comps, temperature=0.8)  # what PPO computes
    with torch.no_grad(), b.use(None):
        ref = b.completion_logprobs(prompts, comps, temperature=0.8)
    gap = torch.cat([(g - f).abs() for g, f in zip(gen_lp, full)])
    effect = torch.cat([(f - r).abs() for f, r in zip(full, ref)])
    assert effect.mean() > 0.04  # the adapter matters ...
    # ... and generation samples from exactly that policy, up to bf16 rounding of the KV-cached
    # forward (measured: mean 0.010, max 0.03; a LoRA merged into bf16 weights: 0.05 / 0.28)
    assert gap.mean() < 0.025 and gap.max() < 0.12, (gap.mean(), gap.max())


def test_bf16_greedy_text_is_the_unmerged_policy_argmax(bf16_bundle):
    """Every token of greedy generation is an argmax of the unmerged adapter's full forward pass
    (within bf16 noise), i.e. greedy text equals greedy decoding with the unmerged adapter."""
    b = bf16_bundle
    set_lora_b(b, "explainer", 3e-2, seed=2)  # a stronger adapter: greedy text moves off the base
    try:
        prompts = prompts_of(b, 8)
        args = argparse.Namespace(gen_batch=8, temperature=1.0, max_new_tokens=10, save_every=100)
        comps = stage2_reward.generate(b, "explainer", prompts, args, True)
        head = b.base.get_output_embeddings()
        worst = 0.0
        with torch.no_grad():
            with b.use(None):
                base_comps = b.generate(prompts, greedy=True, max_new_tokens=10)
            with b.use("explainer"):
                for p, c in zip(prompts, comps):
                    h, _, _ = b.hidden([p + c])
                    z = h[0, len(p) - 1:len(p) + len(c) - 1].float() @ head.weight.float().T
                    lp = torch.log_softmax(z + b.policy_bias(), -1)
                    chosen = lp[torch.arange(len(c)), torch.tensor(c)]
                    worst = max(worst, float((lp.max(-1).values - chosen).max()))
        differs_from_base = sum(x != y for x, y in zip(comps, base_comps))
        assert differs_from_base >= 2  # the adapter changes greedy text
        assert worst < 0.1, worst      # and greedy follows the unmerged adapter's argmax
    finally:
        set_lora_b(b, "explainer", 3e-3)


def test_lm_head_reads_a_contiguous_input_when_generating_distinct_prompts(bf16_bundle):
    """generate() over distinct prompts hands lm_head the last position as a [B, 1, H] slice;
    for a frozen weight torch's matmul then copies the weight once per row (1.5 s at B = 32
    on SmolLM2 in bf16, scripts/bench_generation.py --lm-head). LLM.lm_head_hook lays the input out
    contiguously first; the logits are the same numbers."""
    b = bf16_bundle
    head = b.base.get_output_embeddings()
    seen = []
    probe = head.register_forward_pre_hook(lambda m, a: seen.append((a[0].shape, a[0].is_contiguous())))
    try:
        with b.use("explainer"):
            out = b.generate(prompts_of(b, 6), greedy=True, max_new_tokens=3)
    finally:
        probe.remove()
    assert out and seen and seen[0][0][:2] == (6, 1)  # the prefill's last position, all 6 rows
    assert all(contiguous for _, contiguous in seen), seen
    x = torch.randn(4, 7, head.weight.shape[1], dtype=head.weight.dtype)[:, -1:]
    with torch.inference_mode():
        assert torch.equal(head(x), torch.nn.functional.linear(x, head.weight))


def test_bench_generation_lm_head_times_both_layouts():
    """scripts/bench_generation.py --lm-head runs on the tiny model: one row per batch and
    layout, and leaves nothing checked about speed."""
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_generation.py"
    out = subprocess.run([sys.executable, str(script), "--lm-head", "--model", "tiny", "--dtypes",
                          "float32", "--batches", "2,4", "--prompts", "4", "--repeats", "1",
                          "--new-tokens", "2", "--threads", "1"],
                         capture_output=True, text=True, check=True).stdout
    rows = [line for line in out.splitlines() if line.startswith("| float32 |")]
    assert [r.split(" | ")[1:3] for r in rows] == [["2", "contiguous (hook)"], ["2", "strided view (no hook)"],
                                                   ["4", "contiguous (hook)"], ["4", "strided view (no hook)"]], out


def test_bench_ppo_update_compares_attention_kernels():
    """scripts/bench_ppo_update.py --attn sdpa,eager runs one PPO update per attention kernel of
    transformers on the tiny model: a row each, named by the kernel; nothing about speed."""
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_ppo_update.py"
    out = subprocess.run([sys.executable, str(script), "--model", "tiny", "--dtype", "float32",
                          "--rollouts", "4", "--minibatch", "2", "--prompt-len", "6",
                          "--completion-len", "3", "--top", "", "--attn", "sdpa,eager",
                          "--repeats", "1"], capture_output=True, text=True, check=True).stdout
    rows = [line.split(" | ")[0] for line in out.splitlines() if line.startswith("| all layers")]
    assert rows == ["| all layers, q/v, sdpa attention", "| all layers, q/v, eager attention"], out


def test_bench_attention_times_each_forward_with_both_kernels():
    """scripts/bench_attention.py runs every kind of forward with sdpa and eager on the tiny
    model: one row each; nothing about speed."""
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_attention.py"
    out = subprocess.run([sys.executable, str(script), "--model", "tiny", "--dtype", "float32",
                          "--prompts", "4", "--k", "2", "--new-tokens", "3", "--batch", "2",
                          "--repeats", "1", "--threads", "1"], capture_output=True, text=True, check=True).stdout
    rows = [line.split(" | ")[0][2:] for line in out.splitlines() if line.startswith("| ")]
    assert [r.split()[0] for r in rows] == ["forward", "generate", "generate", "score", "log-probs",
                                            "PPO"], out


def test_bench_rng_times_both_samplers_and_both_dropouts():
    """scripts/bench_rng.py runs on the tiny model: a row for each sampler and each LoRA dropout
    (and leaves nothing checked about speed)."""
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_rng.py"
    out = subprocess.run([sys.executable, str(script), "--model", "tiny", "--dtype", "float32",
                          "--repeats", "1", "--prompts", "2", "--k", "2", "--prompt-tokens", "8",
                          "--new-tokens", "3", "--batch", "2", "--answer-layer", "0",
                          "--lora-layers", "1"], capture_output=True, text=True, check=True).stdout
    rows = [line.split(" | ")[0] for line in out.splitlines() if line.startswith("| ")
            and not line.startswith("| ---")]
    assert rows == ["| sampler", "| multinomial", "| inverse-cdf", "| LoRA dropout",
                    "| torch nn.Dropout", "| ctr_ops.Dropout"], out
    assert "x 3 new tokens" in out, out


def test_llm_has_no_merged_generation_path():
    assert not hasattr(llm.LLM, "merged")


# ---- 2. stored log-probs are of the distribution that sampled -------------------------------------
def test_sampled_token_frequencies_match_stored_logprobs():
    """Many one-token samples at temperature 0.7 with special tokens suppressed: the empirical
    frequency of each token matches exp(log-prob as stage2_reward stores it) within sampling error."""
    b = llm.LLM("tiny", "float32")
    b.attach({"explainer": None})
    set_lora_b(b, "explainer", 0.2)
    prompt = prompts_of(b, 1)[0]
    T, n, batch = 0.7, 6000, 1000
    args = argparse.Namespace(gen_batch=batch, temperature=T, max_new_tokens=1, save_every=10**6)
    torch.manual_seed(0)
    comps, _ = stage2_reward.generate(b, "explainer", [prompt] * n, args, False)
    counts = np.bincount([c[0] for c in comps], minlength=len(b.tok))
    V = b.base.get_output_embeddings().weight.shape[0]
    every = [[t] for t in range(V)]
    stored = stage2_reward.token_logprobs(b, "explainer", [prompt] * V, every, 256, T)
    p = np.exp([x[0] for x in stored])
    assert abs(p.sum() - 1) < 1e-4
    assert np.all(p[b.suppress] == 0) and counts[b.suppress].sum() == 0
    big = p * n >= 20
    z = (counts[big] - n * p[big]) / np.sqrt(n * p[big] * (1 - p[big]))
    assert np.abs(z).max() < 4.5, np.abs(z).max()
    assert 0.5 * np.abs(counts / n - p).sum() < 0.06  # total variation, sampling noise ~0.03


def test_inverse_cdf_sampler_draws_softmax_of_the_tempered_scores():
    """llm.InverseCDFSampler on known scores: each row's tokens follow softmax(scores / T)
    (the first and last vocabulary entries included, -inf never drawn), the returned scores put
    0 on the drawn token and -inf elsewhere, the kept scores are the tempered ones, and
    torch.manual_seed fixes the draws."""
    T, n = 0.5, 40000
    row = torch.tensor([1.0, float("-inf"), 0.0, 0.5, float("-inf"), 0.8])
    scores = row.repeat(n, 1)
    torch.manual_seed(3)
    s = llm.InverseCDFSampler(T, keep_scores=True)
    out = s(None, scores)
    tok = out.argmax(1)
    assert torch.equal(out[torch.arange(n), tok], torch.zeros(n))
    assert torch.isinf(out).sum() == n * (row.numel() - 1)
    torch.testing.assert_close(s.scores[0], scores / T)
    p = torch.softmax(row / T, 0).numpy()
    counts = np.bincount(tok.numpy(), minlength=row.numel())
    assert counts[1] == counts[4] == 0
    z = (counts - n * p)[p > 0] / np.sqrt(n * p * (1 - p))[p > 0]
    assert np.abs(z).max() < 4.5, (counts / n, p)
    torch.manual_seed(3)
    assert torch.equal(llm.InverseCDFSampler(T)(None, scores).argmax(1), tok)
    assert llm.InverseCDFSampler(T).scores == []  # keep_scores off: nothing kept
    with pytest.raises(common.ExpCTRError, match="temperature"):
        llm.InverseCDFSampler(0.0)
    with pytest.raises(common.ExpCTRError, match="NaN"):
        llm.InverseCDFSampler(1.0)(None, torch.tensor([[0.0, float("nan")]]))
    # resolution: 4,000 tokens of probability 2.5e-8 each after one that holds the rest, below
    # half a float32 step of the cumulative sum near 1; a uniform at the middle of token k's
    # interval must draw token k
    row = torch.tensor([[0.0] + [math.log(2.5e-8)] * 4000])
    cdf = torch.softmax(row[0].double(), 0).cumsum(0)
    ks = [1, 2, 1000, 4000]
    mid = torch.tensor([[(cdf[k - 1] + cdf[k]).item() / 2] for k in ks], dtype=torch.float64)
    real_rand = torch.rand
    torch.rand = lambda shape, dtype=None, device=None: mid.to(dtype or torch.float32)
    try:
        got = llm.InverseCDFSampler(1.0)(None, row.repeat(len(ks), 1)).argmax(1).tolist()
    finally:
        torch.rand = real_rand
    assert got == ks, got


def test_lora_dropouts_are_the_counter_based_dropout():
    """attach() gives every LoRA of a fresh or loaded adapter ctr_ops.Dropout with its p: in
    training it keeps ~1 - p of the inputs scaled by 1 / (1 - p), fixed by torch.manual_seed."""
    import ctr_ops
    b = llm.LLM("tiny", "float32")
    b.attach({"scorer": None}, lora_dropout=0.3)
    drops = [d for m in b.model.modules() for d in getattr(m, "lora_dropout", {}).values()]
    assert drops and all(type(d) is ctr_ops.Dropout and d.p == 0.3 for d in drops)
    d = drops[0].train()
    x = torch.randn(300, 200, requires_grad=True)
    torch.manual_seed(0)
    y = d(x)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / 0.7)
    assert abs(kept.float().mean().item() - 0.7) < 4 * (0.21 / x.numel()) ** 0.5
    g = torch.randn_like(x)
    torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], g * kept / 0.7)
    torch.manual_seed(0)
    assert torch.equal(d(x), y)
    assert torch.equal(d.eval()(x), x)
    # set_lora_dropouts (what attach calls, and scripts/bench_rng.py's switch): torch's and back
    b.model.eval()
    assert llm.set_lora_dropouts(b.model, torch.nn.Dropout) == len(drops)
    back = [d for m in b.model.modules() for d in getattr(m, "lora_dropout", {}).values()]
    assert all(type(d) is torch.nn.Dropout and d.p == 0.3 and not d.training for d in back)
    assert llm.set_lora_dropouts(b.model) == len(drops) and llm.set_lora_dropouts(b.model) == 0
    b0 = llm.LLM("tiny", "float32")
    b0.attach({"scorer": None}, lora_dropout=0.0)  # peft's nn.Identity stays
    assert llm.set_lora_dropouts(b0.model) == 0


def test_generate_min_new_tokens_holds_eos_back():
    """min_new_tokens = N: no row ends before N new tokens, greedy or sampled (the benchmark's
    equal work), where without it an EOS-favouring model stops every row at once."""
    b = llm.LLM("tiny", "float32")
    b.attach({"explainer": None})
    bias = torch.zeros(b.base.config.vocab_size)
    bias[b.eos_id] = 1e4
    hook = b.base.lm_head.register_forward_hook(lambda m, i, o: o + bias)
    prompts = [[5, 6, 7], [8, 9, 10, 11]]
    try:
        with b.use("explainer"):
            for greedy in (True, False):
                assert b.generate(prompts, greedy=greedy, max_new_tokens=4) == [[b.eos_id]] * 2
                rows, lps = b.generate(prompts, greedy=greedy, max_new_tokens=6, min_new_tokens=4,
                                       return_logprobs=True)
                assert all(len(r) == 5 and b.eos_id not in r[:4] and r[4] == b.eos_id for r in rows), rows
                # the sampler saw EOS held back (transformers runs ours after its processors)
                assert all(torch.isfinite(lp).all() and lp[:4].min() > -30 for lp in lps), lps
    finally:
        hook.remove()


def test_rollouts_store_float32_logprobs_of_the_sampler(tiny_run, tmp_path):
    d = copy_run(tiny_run, tmp_path / "r")
    stage2_reward.main(["--run-dir", str(d), "--iter", "1", *ROLL, "--temperature", "0.7"])
    rows = common.read_jsonl(RunPaths(d).rollouts(1))
    vals = [x for r in rows for x in r["logp_old"]]
    assert all(np.float32(x) == x for x in vals)  # float32 values, unrounded
    assert any(round(x, 6) != x for x in vals)
    assert {r["temperature"] for r in rows} == {0.7} and {r["phase"] for r in rows} == {"lc"}
    gap = [m for m in common.read_jsonl(RunPaths(d).metrics) if m.get("iter") == 1][-1]
    assert gap["behaviour_gap"] < 1e-4  # generation-time log-probs == stored logp_old (fp32)


# ---- 3. rewards on prompts no reward model trained on ---------------------------------------------
def test_rl_and_probe_prompts_are_never_reward_model_training_samples(tmp_path):
    full, sub = tmp_path / "full", tmp_path / "sub"
    world = ["--dataset", "synthetic", "--n-users", "60", "--n-items", "40", "--n-interactions", "1500",
             "--history-len", "4"]
    data_prep.main(["--run-dir", str(full), *world])
    data_prep.main(["--run-dir", str(sub), *world, "--max-samples", "train=12", "--max-samples",
                    "rl=8", "--max-samples", "probe=3"])
    key = lambda run, s: {(r["uid"], r["iid"]) for r in common.load_split(RunPaths(run), s)}
    train_full, train_sub = key(full, "train"), key(sub, "train")
    for run in (full, sub):
        rl, probe = key(run, "rl"), key(run, "probe")
        assert rl and probe
        # neither the subset's reward models nor the full-data ID models (the quick preset's
        # id_ctr and ExpCTR-Aug warm start) train on an RL or probe prompt
        assert not (rl | probe) & train_full and not (rl | probe) & train_sub and not rl & probe
    assert key(sub, "rl") <= key(full, "rl") and key(sub, "probe") <= key(full, "probe")
    part = common.read_json(RunPaths(sub).meta)["prompt_partition"]
    assert part["rl_frac"] == 0.1 and part["probe_frac"] == 0.02 and part["seed"] == 0


def test_rollout_prompts_come_from_rl_only(tiny_run, tmp_path):
    d = copy_run(tiny_run, tmp_path / "r")
    P = RunPaths(d)
    train = {(r["uid"], r["iid"]) for r in common.load_split(P, "train")}
    rl = {(r["uid"], r["iid"]) for r in common.load_split(P, "rl")}
    seen = set()
    for k in (1, 2):
        if k == 2:
            stage3_rl.main(["--run-dir", str(d), "--iter", "1", *PPO])
        stage2_reward.main(["--run-dir", str(d), "--iter", str(k), *ROLL])
        got = {(r["uid"], r["iid"]) for r in common.read_jsonl(P.rollouts(k))}
        assert got <= rl and not got & train
        assert not got & seen  # fresh prompts each iteration while rl lasts
        seen |= got
    idx = [stage2_reward.iteration_prompts(8, 3, k, 0) for k in (1, 2, 3, 4)]
    assert sorted(np.concatenate(idx[:2]).tolist()) == sorted(set(np.concatenate(idx[:2]).tolist()))
    assert all(len(i) == 3 for i in idx)


# ---- 4. the reward probe: like with like ---------------------------------------------------------
def test_probe_same_prompts_for_every_policy_and_a_curve_with_cis(tiny_run, tmp_path):
    d = copy_run(tiny_run, tmp_path / "r")
    P = RunPaths(d)
    stage2_reward.main(["--run-dir", str(d), "--probe", "base", *ROLL])
    for k, lr in ((1, "0"), (2, "0.05")):  # iter_1 = the base policy (lr 0), iter_2 moves
        stage2_reward.main(["--run-dir", str(d), "--iter", str(k), *ROLL])
        stage3_rl.main(["--run-dir", str(d), "--iter", str(k), *PPO, "--lr", lr])
        stage2_reward.main(["--run-dir", str(d), "--probe", f"iter_{k}", *ROLL])
    a, a1, b = (common.read_jsonl(P.probe(t)) for t in ("base", "iter_1", "iter_2"))
    probe = common.load_split(P, "probe")
    assert len(a) == len(probe) * 2 == len(b)
    assert [(r["uid"], r["iid"], r["group"]) for r in a] == [(r["uid"], r["iid"], r["group"]) for r in b]
    # the same sampling seed for every policy: a policy equal to the base samples the same text
    assert [r["explanation"] for r in a1] == [r["explanation"] for r in a]
    assert all(r["kl_ref"] == 0 for r in a) and any(r["kl_ref"] != 0 for r in b)
    again = copy_run(d, tmp_path / "again")  # same seed -> identical probe
    stage2_reward.main(["--run-dir", str(again), "--probe", "base", *ROLL, "--force"])
    assert common.read_jsonl(RunPaths(again).probe("base")) == a
    args = argparse.Namespace(n_boot=200, seed=0)
    rows, const, notes = evaluate.probe_curve(P, common.load_split(P, "train"), args)
    assert [r["tag"] for r in rows] == ["base", "iter_1", "iter_2"] and not notes
    for r, f in zip(rows, (a, a1, b)):
        assert r["r_lc_ci"][0] <= r["r_lc"] <= r["r_lc_ci"][1]
        assert r["r_lc"] == pytest.approx(np.mean([x["r_lc"] for x in f]))
    assert rows[2]["delta"] == pytest.approx(rows[2]["r_lc"] - rows[0]["r_lc"])
    prior = np.mean([s["label"] for s in common.load_split(P, "train")])
    y = np.array([x["label"] for x in a])
    assert const["r_lc"] == pytest.approx(np.mean(y * math.log(prior) + (1 - y) * math.log(1 - prior)))



def test_base_probe_skips_the_log_prob_passes(tiny_run, tmp_path, monkeypatch):
    """The base policy is the reference: its probe writes KL 0 without a log-prob pass (the
    passes cost a third of a probe); a trained policy's probe runs both (policy, reference)."""
    d = copy_run(tiny_run, tmp_path / "r")
    calls = []
    real = stage2_reward.token_logprobs
    monkeypatch.setattr(stage2_reward, "token_logprobs",
                        lambda bundle, adapter, *a: calls.append(adapter) or real(bundle, adapter, *a))
    stage2_reward.main(["--run-dir", str(d), "--probe", "base", *ROLL])
    assert calls == [] and all(r["kl_ref"] == 0 for r in common.read_jsonl(RunPaths(d).probe("base")))
    stage2_reward.main(["--run-dir", str(d), "--iter", "1", *ROLL])
    stage3_rl.main(["--run-dir", str(d), "--iter", "1", *PPO, "--lr", "0.05"])
    calls.clear()
    stage2_reward.main(["--run-dir", str(d), "--probe", "iter_1", *ROLL])
    assert "explainer" in calls and None in calls

# ---- 5. PPO pieces that fail when wrong ----------------------------------------------------------
def test_k3_kl_hand_computed_direction():
    """KL(pi || ref) estimated on samples of pi, k3 = r - log r - 1 with r = pi_ref / pi:
    pi = 0.5, pi_ref = 0.25 gives 0.5 - log 0.5 - 1 = 0.19315 (reversed d would give 0.30685)."""
    v = stage3_rl.k3_kl(torch.log(torch.tensor([0.5])), torch.log(torch.tensor([0.25])))
    assert v.item() == pytest.approx(0.5 - math.log(0.5) - 1, abs=1e-6)


def test_ppo_loss_ignores_whatever_padded_slots_hold():
    torch.manual_seed(0)
    logp = (-torch.rand(2, 4)).requires_grad_(True)
    old, ref = -torch.rand(2, 4), -torch.rand(2, 4)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    adv = torch.tensor([1.0, -0.5])
    clean, _ = stage3_rl.ppo_loss(logp, old, ref, adv, mask, kl_beta=0.1)
    clean.backward()
    g_clean = logp.grad.clone()
    for garbage in (float("nan"), float("inf"), 1e4):
        lp = logp.detach().clone()
        lp[~mask] = garbage
        lp.requires_grad_(True)
        o, r = old.clone(), ref.clone()
        o[~mask], r[~mask] = garbage, -garbage
        loss, st = stage3_rl.ppo_loss(lp, o, r, adv, mask, kl_beta=0.1)
        loss.backward()
        assert torch.equal(loss, clean) and torch.equal(lp.grad, g_clean), garbage
        assert all(math.isfinite(v) for v in st.values())


def test_first_ppo_step_ratio_is_one_at_a_later_iteration_with_dropout(tiny_run, tmp_path):
    """Iteration 2 loads policy/iter_1, whose adapter config has LoRA dropout 0.05: the logged
    ratio of the first minibatch (before any update) is 1 within fp32 rounding."""
    d = copy_run(tiny_run, tmp_path / "r")
    P = RunPaths(d)
    for k in (1, 2):
        stage2_reward.main(["--run-dir", str(d), "--iter", str(k), *ROLL])
        stage3_rl.main(["--run-dir", str(d), "--iter", str(k), *PPO, "--lr", "0.05"])
    assert common.read_json(P.policy(1) / "adapter_config.json")["lora_dropout"] == 0.05
    rows = [m for m in common.read_jsonl(P.metrics) if m["stage"] == "stage3_rl"]
    assert [r["iter"] for r in rows] == [1, 2]
    r2 = common.read_jsonl(P.rollouts(2))
    assert any(r["logp_old"] != r["logp_ref"] for r in r2)  # iter_1 moved away from the base
    for r in rows:
        assert r["ratio_first_step"] == pytest.approx(1.0, abs=1e-6)
        assert r["ratio_first_step_max_dev"] < 1e-5


def test_ppo_without_signal_leaves_the_policy_unchanged(tiny_run, tmp_path):
    """Equal rewards (zero advantage) and no KL term: the adapter must not move (the default
    weight decay of AdamW would shrink LoRA A toward 0)."""
    from safetensors.torch import load_file
    d = copy_run(tiny_run, tmp_path / "r")
    P = RunPaths(d)
    stage2_reward.main(["--run-dir", str(d), "--iter", "1", *ROLL])
    rows = common.read_jsonl(P.rollouts(1))
    common.write_jsonl(P.rollouts(1), [dict(r, reward=-0.5) for r in rows])
    stage3_rl.main(["--run-dir", str(d), "--iter", "1", *PPO, "--kl-beta", "0", "--lr", "0.1"])
    b = llm.LLM("tiny", "float32")
    torch.manual_seed(0 + 1)  # stage3_rl seeds the fresh LoRA with seed + k
    b.attach({"explainer": None})
    fresh = {n.replace(".explainer", ""): p.detach() for n, p in b.model.named_parameters()
             if "lora_" in n}
    saved = load_file(P.policy(1) / "adapter_model.safetensors")
    assert saved.keys() == fresh.keys()
    for k, v in saved.items():
        assert torch.equal(v, fresh[k]), k
    assert [m for m in common.read_jsonl(P.metrics) if m["stage"] == "stage3_rl"][-1]["weight_decay"] == 0


# ---- 6. smaller faults ---------------------------------------------------------------------------
def test_force_replacing_a_folder_never_leaves_neither(tmp_path, monkeypatch):
    import os
    out = tmp_path / "policy"
    with common.atomic_path(out) as t:
        t.mkdir()
        (t / "w").write_text("old")
    real = os.replace

    def failing(src, dst):
        if str(src).endswith("/policy") and str(dst) == str(out):
            raise KeyboardInterrupt("killed between the two renames")
        return real(src, dst)
    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(KeyboardInterrupt):
        with common.atomic_path(out) as t:
            t.mkdir()
            (t / "w").write_text("new")
    assert (out / "w").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["policy"]  # no temp folder left either


def test_rerun_rows_are_not_double_counted(tmp_path):
    P = RunPaths(tmp_path)
    for it, kl in ((1, 0.5), (2, 0.7), (1, 0.1)):  # iteration 1 was re-run with --force
        common.log_metrics(P.metrics, "stage3_rl", iter=it, phase="lc", reward=-kl, r_lc=-kl,
                           r_ic=None, kl=kl, ratio_first_step=1.0)
    assert [(r["iter"], r["kl"]) for r in evaluate.ppo_curve(P)] == [(1, 0.1), (2, 0.7)]
    with open(tmp_path / "timings.jsonl", "w") as f:
        for step, sec in (("a", 1), ("b", 2), ("a", 3)):
            f.write(f'{{"step": "{step}", "seconds": {sec}}}\n')
    assert evaluate.step_timings(P) == [{"step": "b", "seconds": 2}, {"step": "a", "seconds": 3}]


def test_early_stopping_means_the_same_in_every_stage(tiny_run, tmp_path, monkeypatch):
    """patience N = stop after N epochs in a row without a better valid AUC, in stage1_sft and
    train_ctr alike: with a valid AUC that never improves, patience 1 runs exactly 2 epochs."""
    import stage1_sft
    import train_ctr
    d = copy_run(tiny_run, tmp_path / "r")
    stage2_reward.main(["--run-dir", str(d), "--split", "train,valid", "--tag", "base", *ROLL[:4],
                        "--max-new-tokens", "3"])
    import shutil
    shutil.rmtree(RunPaths(d).scorer)
    monkeypatch.setattr(stage1_sft, "auc", lambda y, p: 0.6)
    stage1_sft.main(["--run-dir", str(d), "--model", "tiny", "--dtype", "float32", "--epochs", "5",
                     "--patience", "1", "--batch-size", "6"])
    assert common.read_json(RunPaths(d).scorer / "metrics.json")["epochs_run"] == 2
    real = train_ctr.evaluate_predictions
    monkeypatch.setattr(train_ctr, "evaluate_predictions", lambda y, p, u: dict(real(y, p, u), auc=0.6))
    train_ctr.main(["--run-dir", str(d), "--model", "din", "--epochs", "5", "--patience", "1"])
    assert common.read_json(RunPaths(d).ctr("din") / "metrics.json")["epochs_run"] == 2


def test_activation_checkpointing_gives_the_same_ppo_update(tiny_run, tmp_path):
    """--grad-checkpoint recomputes activations in backward: same adapter (float tolerance), and
    it is really on in PPO's eval mode (the decoder layers run under checkpointing)."""
    from safetensors.torch import load_file
    out = {}
    for ck in (False, True):
        d = copy_run(tiny_run, tmp_path / f"r{ck}")
        stage2_reward.main(["--run-dir", str(d), "--iter", "1", *ROLL])
        stage3_rl.main(["--run-dir", str(d), "--iter", "1", *PPO, "--lr", "0.01",
                        *(["--grad-checkpoint"] if ck else [])])
        out[ck] = load_file(RunPaths(d).policy(1) / "adapter_model.safetensors")
    moved = max((out[False][k] - out[True][k]).abs().max().item() for k in out[False])
    assert moved < 1e-5, moved
    b = llm.LLM("tiny", "float32")
    b.attach({"explainer": None})
    b.model.eval()
    b.activation_checkpointing(True)
    layer = b._parts()[0].layers[0]
    assert layer.gradient_checkpointing and layer.training
    assert not any(m.training for m in layer.modules() if m is not layer)  # no LoRA dropout


def test_explainer_top_layers_from_cached_lower_states_equal_the_full_forward():
    """stage3_rl --lora-layers N runs the frozen lower layers once per iteration: the top layers
    run from those states give completion_logprobs()'s log-probs, entropies and LoRA gradients."""
    b = llm.LLM("tiny", "float32")
    b.attach({"explainer": None}, targets=llm.ALL_PROJ, top_layers=1)
    assert b.top_lora_layers("explainer") == 1
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in b.model.named_parameters():
            if "lora_B.explainer" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    prompts = [b.explainer_ids("The user liked: A, B.\nTarget item: C."), b.explainer_ids("liked D.")]
    comps = [b.encode(" He will like it."), b.encode(" No")]
    params = b.trainable("explainer")
    got = []
    for path in ("full", "cached"):
        with b.use("explainer"):
            lp, ent = (b.completion_logprobs(prompts, comps, entropy=True, temperature=0.7)
                       if path == "full" else b.upper_completion_logprobs(
                           b.lower_states([p + c for p, c in zip(prompts, comps)], 1, 4), comps, 1,
                           entropy=True, temperature=0.7))
        for p in params:
            p.grad = None
        (torch.cat(lp) * torch.linspace(-1, 1, sum(map(len, comps)))).sum().backward()
        got.append((torch.cat(lp).detach(), torch.cat(ent).detach(), [p.grad.clone() for p in params]))
    (lp_f, e_f, g_f), (lp_c, e_c, g_c) = got
    assert torch.allclose(lp_f, lp_c, atol=1e-5), (lp_f - lp_c).abs().max()
    assert torch.allclose(e_f, e_c, atol=1e-5)
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(g_f, g_c))
    assert any(float(x.abs().sum()) > 0 for x in g_c)
    full = llm.LLM("tiny", "float32")
    full.attach({"explainer": None})
    assert full.top_lora_layers("explainer") == 0  # LoRA in every layer: nothing to skip


def test_ppo_with_top_layer_lora_is_the_full_forward_update(tiny_run, tmp_path, monkeypatch):
    """--lora-layers 1: the adapter of iteration 1 adapts the top layer only, iteration 2 keeps
    it, and the update from cached lower states equals the one through the whole model."""
    from safetensors.torch import load_file
    out = {}
    for path in ("cached", "full"):
        if path == "full":
            monkeypatch.setattr(llm.LLM, "top_lora_layers", lambda self, name: 0)
        d = copy_run(tiny_run, tmp_path / path)
        P = RunPaths(d)
        for k in (1, 2):
            if path == "full" and k == 2:  # the same rollouts as the cached path: its iteration
                # 1 policy differs from this one by float rounding, enough to draw another token
                shutil.copy(RunPaths(tmp_path / "cached").rollouts(2), P.rollouts(2))
            else:
                stage2_reward.main(["--run-dir", str(d), "--iter", str(k), *ROLL])
            stage3_rl.main(["--run-dir", str(d), "--iter", str(k), *PPO, "--lr", "0.01",
                            "--lora-layers", "1", "--lora-targets", "all"])
        out[path] = load_file(P.policy(2) / "adapter_model.safetensors")
        cfg = common.read_json(P.policy(2) / "adapter_config.json")
        n_layers = llm.LLM("tiny", "float32").n_layers
        assert cfg["layers_to_transform"] == [n_layers - 1] and len(cfg["target_modules"]) == 7
        rows = [m for m in common.read_jsonl(P.metrics) if m["stage"] == "stage3_rl"]
        assert [r["lora_top_layers"] for r in rows] == ([1, 1] if path == "cached" else [0, 0])
    assert out["cached"].keys() == out["full"].keys()
    assert all(f".layers.{n_layers - 1}." in k for k in out["cached"])
    # equal up to float rounding, as Adam passes it on: a coordinate whose gradient is ~0 can move
    # by up to lr on rounding alone (its step is g / sqrt(v)), so the two updates are compared
    # as wholes; lora_B starts at 0, so its values are the update
    diff = sum(float((out["cached"][k] - out["full"][k]).square().sum()) for k in out["cached"]) ** 0.5
    update = sum(float(v.square().sum()) for k, v in out["full"].items() if "lora_B" in k) ** 0.5
    assert diff < 1e-3 * update, (diff, update)
