"""Tests of llm.py, stage1_sft.py, stage2_reward.py, stage3_rl.py (tiny random model, synthetic data;
nothing is downloaded). PPO math on hand-made numbers; LC reward; label leak; determinism; resume."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import common
import data_prep
import llm
import metrics
import stage1_sft
import stage2_reward
import stage3_rl
from common import ExpCTRError, RunPaths
from conftest import copy_run

ROLL = ["--model", "tiny", "--dtype", "float32", "--max-new-tokens", "6", "--prompts-per-iter", "3",
        "--k-samples", "2", "--gen-batch", "4", "--fwd-batch", "4"]


# ---- PPO math on hand-made numbers ---------------------------------------------------------
def test_group_advantages_leave_one_out_and_normalised():
    r = [1.0, 2.0, 3.0, 5.0, 5.0, 5.0, 7.0]
    g = [0, 0, 0, 1, 1, 1, 2]
    raw = stage3_rl.group_advantages(r, g, "none")
    np.testing.assert_allclose(raw, [1 - 2.5, 2 - 2.0, 3 - 1.5, 0, 0, 0, 0])
    adv = stage3_rl.group_advantages(r, g)
    np.testing.assert_allclose(adv, raw / raw.std())
    # all-equal groups (and a whole batch of them) give zeros, never NaN
    for norm in stage3_rl.ADV_NORMS:
        z = stage3_rl.group_advantages([0.3] * 4, [0, 0, 1, 1], norm)
        assert np.all(z == 0) and not np.any(np.isnan(z))
    with pytest.raises(common.ExpCTRError, match="advantage norm 'grp'"):
        stage3_rl.group_advantages(r, g, "grp")


def test_group_scaled_advantages_weigh_every_prompt_alike():
    """norm "group" (GRPO's scaling): each group's RLOO advantages divided by their own std, so a
    group whose rewards spread 2.6x wider (the clicked targets of a scorer that under-predicts
    clicks) pushes no harder than the others; under "batch" it does."""
    r = np.array([-1.2, -0.6, -1.5, -0.9, -0.30, -0.40, -0.35, -0.25])  # group 0 wide, 1 narrow
    g = [0, 0, 0, 0, 1, 1, 1, 1]
    raw = stage3_rl.group_advantages(r, g, "none")
    adv = stage3_rl.group_advantages(r, g, "group")
    np.testing.assert_allclose(adv[:4], raw[:4] / raw[:4].std(), rtol=1e-6)
    np.testing.assert_allclose(adv[4:], raw[4:] / raw[4:].std(), rtol=1e-6)
    assert adv[:4].std() == pytest.approx(1) and adv[4:].std() == pytest.approx(1)
    b = stage3_rl.group_advantages(r, g, "batch")
    assert b[:4].std() > 3 * b[4:].std()  # batch scaling keeps the wide group dominant
    # a group spread only by rounding noise gets no weight (not scaled up to unit std)
    noisy = stage3_rl.group_advantages([-0.5, -0.5 + 1e-5, -0.5 - 1e-5, -0.5, -1.0, -0.2], [0] * 4 + [1] * 2, "group")
    assert np.all(noisy[:4] == 0) and np.allclose(np.abs(noisy[4:]), 1)
    # the same ranking within each group as the raw advantages
    assert (np.argsort(adv[:4]) == np.argsort(raw[:4])).all() and (np.argsort(adv[4:]) == np.argsort(raw[4:])).all()


def test_ppo_clipping_and_gradients():
    old = torch.zeros(1, 3)
    ref = torch.zeros(1, 3)
    mask = torch.ones(1, 3, dtype=torch.bool)
    # ratios 1.5, 0.5, 1.1 with a positive advantage
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]])).requires_grad_(True)
    loss, st = stage3_rl.ppo_loss(logp, old, ref, torch.tensor([2.0]), mask, clip_eps=0.2)
    # per token: -A*min(r, clip(r)) -> -2*1.2, -2*0.5, -2*1.1
    assert loss.item() == pytest.approx(-(2 * 1.2 + 2 * 0.5 + 2 * 1.1) / 3, abs=1e-6)
    assert st["clip_frac"] == pytest.approx(2 / 3)
    loss.backward()
    g = logp.grad[0]
    assert g[0] == 0  # clipped above with A>0: no gradient
    assert g[1] < 0 and g[2] < 0  # unclipped: pushes logp up
    # negative advantage: the ratio below 1-eps is clipped instead
    logp2 = torch.log(torch.tensor([[0.5, 1.5]])).requires_grad_(True)
    loss2, _ = stage3_rl.ppo_loss(logp2, torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([-1.0]),
                                  torch.ones(1, 2, dtype=torch.bool), clip_eps=0.2)
    assert loss2.item() == pytest.approx((0.8 + 1.5) / 2, abs=1e-6)
    loss2.backward()
    assert logp2.grad[0, 0] == 0 and logp2.grad[0, 1] > 0


def test_k3_kl_zero_at_reference_positive_elsewhere():
    x = torch.tensor([-0.1, -2.0, -5.0])
    assert torch.all(stage3_rl.k3_kl(x, x) == 0)
    assert torch.all(stage3_rl.k3_kl(x, x + 0.3) > 0)
    _, st = stage3_rl.ppo_loss(x[None], x[None], x[None], torch.tensor([1.0]),
                               torch.ones(1, 3, dtype=torch.bool), kl_beta=1.0)
    assert st["kl"] == 0 and st["ratio"] == pytest.approx(1.0)
    # padding is ignored
    lp, m = stage3_rl.pad([[-1.0, -2.0], [-1.0]])
    assert m.tolist() == [[True, True], [True, False]]


@pytest.fixture(scope="module")
def bundle():
    b = llm.LLM("tiny", "float32")
    b.attach({"explainer": None, "scorer": None})
    return b


# ---- llm.py ------------------------------------------------------------------------------------
def test_no_full_logits_and_answer_tokens(bundle):
    head = bundle.base.get_output_embeddings()
    h = head.register_forward_hook(lambda *a: (_ for _ in ()).throw(AssertionError("lm_head called")))
    try:
        p = bundle.explainer_ids("The user liked: none.")
        with torch.no_grad(), bundle.use("explainer"):
            lp = bundle.completion_logprobs([p, p[:-2]], [[5, 6, 7], [8]])
            ans = bundle.answer_logprobs([bundle.scorer_ids("x", "y"), bundle.scorer_ids("x", None)])
    finally:
        h.remove()
    assert [len(x) for x in lp] == [3, 1] and all(torch.all(x < 0) for x in lp)
    torch.testing.assert_close(ans.exp().sum(1), torch.ones(2))
    assert bundle.tok.decode([bundle.yes_id]) == " Yes" and bundle.tok.decode([bundle.no_id]) == " No"


def test_tokenizer_without_single_answer_token_is_one_line_error(monkeypatch):
    monkeypatch.setattr(llm, "ANSWERS", (" Qzxqvy Yes", " No"))
    with pytest.raises(ExpCTRError, match="single token"):
        llm.LLM("tiny", "float32")


def test_adapter_saved_in_peft_format(bundle, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    with torch.no_grad():
        for n, p in bundle.model.named_parameters():
            if "lora_B.explainer" in n:
                p.fill_(0.01)
    bundle.save_adapter("explainer", tmp_path / "ad")
    base = AutoModelForCausalLM.from_pretrained(llm.model_folder("tiny"))
    pm = PeftModel.from_pretrained(base, str(tmp_path / "ad"))
    w = [p for n, p in pm.named_parameters() if "lora_B" in n]
    assert w and all(torch.all(x == 0.01) for x in w)


# ---- rewards --------------------------------------------------------------------------------------
def test_lc_reward_sign_and_value(bundle, monkeypatch):
    known = torch.log(torch.tensor([[0.8, 0.2], [0.8, 0.2], [0.3, 0.7]]))
    monkeypatch.setattr(bundle, "answer_logprobs_grouped", lambda seqs, keys, b, desc="": known[: len(seqs)])
    r = stage2_reward.lc_reward(bundle, ["a", "b", "c"], ["e", "e", "e"], [1, 0, 1], batch=8)
    np.testing.assert_allclose(r, np.log([0.8, 0.2, 0.3]), rtol=1e-6)
    assert np.all(r < 0) and r[0] > r[1]


def test_lc_reward_matches_scorer_probability(tiny_run):
    b = llm.LLM("tiny", "float32")
    b.attach({"scorer": RunPaths(tiny_run).scorer})
    prompts, expls = ["p one", "p two"], ["because x", "because y"]
    p = stage1_sft.predict_p(b, prompts, [expls], 4)[0]
    r1 = stage2_reward.lc_reward(b, prompts, expls, [1, 1], 4)
    r0 = stage2_reward.lc_reward(b, prompts, expls, [0, 0], 4)
    np.testing.assert_allclose(np.exp(r1), p, rtol=1e-5)
    # atol: p is float32, so 1 - p carries ~6e-8 of absolute rounding (relative 7e-5 at p = 0.9991)
    np.testing.assert_allclose(np.exp(r0), 1 - p, rtol=1e-5, atol=1e-6)
    assert 0 < p.min() and p.max() < 1 and abs(p[0] - 0.5) > 1e-4


def test_ic_reward_log_of_true_label():
    r = stage2_reward.label_logprob(np.array([0.9, 0.9, 0.0]), np.array([1, 0, 1]))
    np.testing.assert_allclose(r[:2], np.log([0.9, 0.1]))
    assert np.isfinite(r[2])


# ---- rollouts: label leak, determinism, PPO consistency -------------------------------------------
def test_rollouts_deterministic_and_label_free(tiny_run, tmp_path):
    a = copy_run(tiny_run, tmp_path / "a")
    b = copy_run(tiny_run, tmp_path / "b")
    flip = copy_run(tiny_run, tmp_path / "flip")
    rows = common.read_jsonl(RunPaths(flip).split("rl"))  # rollouts read the RL prompts
    for r in rows:
        r["label"] = 1 - r["label"]
    common.write_jsonl(RunPaths(flip).split("rl"), rows)
    for d in (a, b, flip):
        stage2_reward.main(["--run-dir", str(d), "--iter", "1", *ROLL])
    ra, rb, rf = (common.read_jsonl(RunPaths(d).rollouts(1)) for d in (a, b, flip))
    assert ra == rb  # same seed -> identical rollouts on CPU
    assert len(ra) == 6 and sorted({r["group"] for r in ra}) == [0, 1, 2]
    for x, y in zip(ra, rf):  # the label never reaches the generation prompt
        assert x["prompt"] == y["prompt"] and x["prompt_ids"] == y["prompt_ids"]
        assert x["completion_ids"] == y["completion_ids"] and x["logp_old"] == y["logp_old"]
        assert x["label"] != y["label"] and x["r_lc"] != y["r_lc"]
    for r in ra:
        assert r["policy"] == "base" and r["model"] == "tiny" and r["reward"] == r["r_lc"]
        assert len(r["logp_old"]) == len(r["completion_ids"]) == len(r["logp_ref"])
    # another seed samples other prompts or explanations
    stage2_reward.main(["--run-dir", str(b), "--iter", "1", *ROLL, "--seed", "7", "--force"])
    assert common.read_jsonl(RunPaths(b).rollouts(1)) != ra

    # PPO: logp_old equals the policy's log-probs at the start (ratio 1), policy/iter_1 appears
    stage3_rl.main(["--run-dir", str(a), "--iter", "1", "--model", "tiny", "--dtype", "float32",
                    "--minibatch", "3", "--ppo-epochs", "1"])
    row = [m for m in common.read_jsonl(RunPaths(a).metrics) if m["stage"] == "stage3_rl"][-1]
    assert row["iter"] == 1 and row["phase"] == "lc" and row["clip_frac"] == 0
    assert 0 <= row["kl"] < 1e-3 and row["tokens_per_s"] > 0
    assert row["adv_norm"] == "batch"
    for y, key in ((1, "reward_std_within_clicked"), (0, "reward_std_within_unclicked")):
        spread = [np.std([r["reward"] for r in ra if r["group"] == g])
                  for g in sorted({r["group"] for r in ra if r["label"] == y})]
        assert (row[key] is None) if not spread else row[key] == pytest.approx(np.mean(spread)), key
    assert (RunPaths(a).policy(1) / "adapter_model.safetensors").exists()
    # iteration 2 samples from policy/iter_1 and stores the reference log-probs separately
    stage2_reward.main(["--run-dir", str(a), "--iter", "2", *ROLL])
    r2 = common.read_jsonl(RunPaths(a).rollouts(2))
    assert all(r["policy"] == "iter_1" for r in r2)
    assert any(r["logp_old"] != r["logp_ref"] for r in r2)


def test_inconsistent_inputs_are_one_line_errors(tiny_run, tmp_path):
    d = copy_run(tiny_run, tmp_path / "r")
    with pytest.raises(ExpCTRError, match="stage2_reward.py --run-dir .* --iter 1"):
        stage3_rl.main(["--run-dir", str(d), "--iter", "1", "--model", "tiny"])
    with pytest.raises(ExpCTRError, match="stage3_rl.py"):
        stage2_reward.main(["--run-dir", str(d), "--iter", "2", *ROLL])
    stage2_reward.main(["--run-dir", str(d), "--iter", "1", *ROLL])
    rows = common.read_jsonl(RunPaths(d).rollouts(1))
    for r in rows:
        r["model"] = "smollm2-135m"
    common.write_jsonl(RunPaths(d).rollouts(1), rows)
    with pytest.raises(ExpCTRError, match="--model smollm2-135m, not tiny"):
        stage3_rl.main(["--run-dir", str(d), "--iter", "1", "--model", "tiny"])
    shutil.rmtree(RunPaths(d).scorer)
    with pytest.raises(ExpCTRError, match="stage1_sft.py"):
        stage2_reward.main(["--run-dir", str(d), "--iter", "3", *ROLL])
    with pytest.raises(ExpCTRError, match="stage2_reward.py .*--tag base"):
        stage1_sft.main(["--run-dir", str(d), "--model", "tiny"])


# ---- resume after an interrupted stage --------------------------------------------------------------
def test_explanations_resume_after_crash(tiny_run, tmp_path, monkeypatch):
    ref = copy_run(tiny_run, tmp_path / "ref")
    cut = copy_run(tiny_run, tmp_path / "cut")
    args = ["--split", "train", "--tag", "base", "--model", "tiny", "--dtype", "float32",
            "--max-new-tokens", "5", "--gen-batch", "3", "--save-every", "1"]
    stage2_reward.main(["--run-dir", str(ref), *args])
    real, calls = llm.LLM.generate, {"n": 0}

    def crashing(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real(self, *a, **k)
    monkeypatch.setattr(llm.LLM, "generate", crashing)
    with pytest.raises(KeyboardInterrupt):
        stage2_reward.main(["--run-dir", str(cut), *args])
    P = RunPaths(cut)
    assert not P.explanations("base", "train").exists()  # no half file
    part = P.root / "explanations" / "base" / ".train.partial.jsonl"
    assert len(common.read_jsonl(part)) == 6  # two batches of 3 saved
    monkeypatch.setattr(llm.LLM, "generate", real)
    stage2_reward.main(["--run-dir", str(cut), *args])
    assert not part.exists()
    a = common.read_jsonl(RunPaths(ref).explanations("base", "train"))
    b = common.read_jsonl(P.explanations("base", "train"))
    assert a == b and len(a) == 12
    np.testing.assert_array_equal(np.load(RunPaths(ref).embeddings("base", "train")),
                                  np.load(P.embeddings("base", "train")))
    stage2_reward.main(["--run-dir", str(cut), *args])  # finished: skipped, unchanged
    assert common.read_jsonl(P.explanations("base", "train")) == a


def test_ppo_killed_while_saving_leaves_no_half_adapter(tiny_run, tmp_path, monkeypatch):
    d = copy_run(tiny_run, tmp_path / "r")
    stage2_reward.main(["--run-dir", str(d), "--iter", "1", *ROLL])
    argv = ["--run-dir", str(d), "--iter", "1", "--model", "tiny", "--dtype", "float32",
            "--minibatch", "6", "--ppo-epochs", "1"]
    import safetensors.torch as st

    def boom(*a, **k):
        raise KeyboardInterrupt("killed while saving")
    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        stage3_rl.main(argv)
    assert not RunPaths(d).policy(1).exists()
    assert not list((RunPaths(d).root / "policy").glob(".*tmp*/iter_1/adapter_model.safetensors"))
    monkeypatch.undo()
    stage3_rl.main(argv)
    w1 = (RunPaths(d).policy(1) / "adapter_model.safetensors").read_bytes()
    stage3_rl.main(argv)  # finished: skipped
    assert (RunPaths(d).policy(1) / "adapter_model.safetensors").read_bytes() == w1
    stage3_rl.main(argv + ["--force"])  # redone from the same inputs: identical weights
    assert (RunPaths(d).policy(1) / "adapter_model.safetensors").read_bytes() == w1


# ---- the smoke preset ------------------------------------------------------------------------------
def test_smoke_run_outputs(smoke_run_dir):
    P = RunPaths(smoke_run_dir)
    info = common.read_json(P.root / "run.json")
    assert info["preset"] == "smoke" and info["model"] == "tiny"
    root = Path(__file__).resolve().parents[1]
    assert (P.root / "preset.toml").read_text() == (root / "presets" / "smoke.toml").read_text()
    final = info["final_tag"]
    k_final = int(final.split("_")[1])
    sm = common.read_json(P.scorer / "metrics.json")
    assert {"valid_auc_with_expl", "valid_auc_no_expl"} <= set(sm)
    for k in range(1, k_final + 1):
        assert (P.policy(k) / "adapter_config.json").exists()
        rows = common.read_jsonl(P.rollouts(k))
        assert rows and all(len(r["logp_old"]) == len(r["completion_ids"]) for r in rows)
    ic = common.read_jsonl(P.rollouts(k_final))
    assert all(r["r_ic"] is not None and r["r_ic"] <= 0 for r in ic)
    m = common.read_jsonl(P.metrics)
    ppo = [r for r in m if r["stage"] == "stage3_rl"]
    assert [r["iter"] for r in ppo] == list(range(1, k_final + 1))
    assert {r["phase"] for r in ppo} == {"lc", "ic"}
    for r in ppo:
        for key in ("reward", "r_lc", "kl", "clip_frac", "entropy", "expl_len", "tokens_per_s"):
            assert np.isfinite(r[key]), key
    assert any(r["stage"] == "stage2_reward" and r.get("expl_per_s") for r in m)
    for tag, splits in (("base", common.SPLITS), (final, ("valid", "test"))):
        for s in splits:
            data = common.read_jsonl(P.split(s))
            ex = common.read_jsonl(P.explanations(tag, s))
            assert [(e["uid"], e["iid"]) for e in ex] == [(d["uid"], d["iid"]) for d in data]
            assert np.load(P.embeddings(tag, s)).shape[0] == len(data)
    for tag in ("none", "base", final):
        preds = common.read_jsonl(P.scorer / f"preds_test_{tag}.jsonl")
        assert len(preds) == len(common.read_jsonl(P.split("test")))
        assert all(0 < r["p"] < 1 for r in preds)
        assert all((r["p_shuffled"] is None) == (tag == "none") for r in preds)
    steps = [json.loads(line)["step"] for line in open(P.root / "timings.jsonl")]
    assert "scorer sft" in steps and "ppo iter 1" in steps


def test_test_split_never_trains_the_llm(tiny_run, tmp_path):
    """Scorer SFT, rollouts and PPO read train (and valid for early stopping) only: flipping every
    test label leaves the scorer and the policy bit-identical."""
    from safetensors.torch import load_file

    adapters = {}
    for name in ("orig", "flipped"):
        d = copy_run(tiny_run, tmp_path / name)
        P = RunPaths(d)
        shutil.rmtree(P.scorer)  # train a scorer here instead of the fixture's random one
        if name == "flipped":
            rows = common.read_jsonl(P.split("test"))
            common.write_jsonl(P.split("test"), [dict(r, label=1 - r["label"]) for r in rows])
        stage2_reward.main(["--run-dir", str(d), "--split", "train,valid", "--tag", "base",
                            *ROLL[:4], "--max-new-tokens", "5", "--gen-batch", "4"])
        stage1_sft.main(["--run-dir", str(d), "--model", "tiny", "--dtype", "float32",
                         "--epochs", "1", "--batch-size", "4", "--lr", "1e-3"])
        stage2_reward.main(["--run-dir", str(d), "--iter", "1", *ROLL])
        stage3_rl.main(["--run-dir", str(d), "--iter", "1", "--model", "tiny", "--dtype",
                        "float32", "--minibatch", "3", "--ppo-epochs", "1"])
        adapters[name] = [load_file(p / "adapter_model.safetensors") for p in (P.scorer, P.policy(1))]
    for a, b in zip(adapters["orig"], adapters["flipped"]):
        assert a.keys() == b.keys() and any(v.abs().sum() > 0 for v in a.values())
        for k in a:
            assert torch.equal(a[k], b[k]), k


# ---- prefix KV reuse: the same numbers as one forward per sequence -------------------------
def _bundle_with_random_adapters(attn: str = "sdpa"):
    b = llm.LLM("tiny", "float32", attn=attn)
    b.attach({"scorer": None, "explainer": None})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in b.model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return b


def test_prefix_kv_reuse_equals_separate_forwards():
    b = _bundle_with_random_adapters()
    prompts = ["The user liked: A, B.\nTarget item: C.", "liked D; disliked E, F, G.\nTarget: H."]
    expls = ["He will like it.", "He will not like it at all.", "He will like it.", None]
    seqs = [b.scorer_ids(p, e) for p in prompts for e in expls]
    keys = [p for p in prompts for _ in expls]
    with b.use("scorer"), torch.inference_mode():
        sep = torch.cat([b.answer_logprobs([s]) for s in seqs])
        grouped = b.answer_logprobs_grouped(seqs, keys, batch_size=3)
    assert torch.allclose(sep, grouped, atol=2e-5), (sep - grouped).abs().max()
    # completions: shared first tokens, an empty one; the reference and the adapter
    pids = [b.explainer_ids(p) for p in prompts for _ in range(3)]
    comps = [b.encode(" He likes it"), b.encode(" He"), [], b.encode(" no"), b.encode(" no way"),
             b.encode(" yes it is")]
    for adapter in ("explainer", None):
        with b.use(adapter), torch.inference_mode():
            sep = [b.completion_logprobs([p], [c])[0] for p, c in zip(pids, comps)]
            grouped = b.completion_logprobs_grouped(pids, comps, batch_size=4)
        assert [len(x) for x in grouped] == [len(c) for c in comps]
        for x, y in zip(sep, grouped):
            assert torch.allclose(x.float(), y, atol=2e-5), (x - y).abs().max()


def test_scorer_target_view_shares_each_explanations_forward_across_its_shuffles(monkeypatch):
    """View "target" puts the explanation before the target, so the shuffle baseline's inputs
    that read one explanation share its forward (one group, its prefix covers the explanation),
    and their p(click) equals separate forwards; an explanation read once keeps its prompt's group."""
    b = _bundle_with_random_adapters()
    b.scorer_view = "target"
    prompts = ["liked A, B.\nTarget item: C.", "liked D; disliked E.\nTarget: H.", "liked F.\nTarget: J."]
    targets = ["C (Drama)", "H (Comedy)", "J (Horror)"]
    expls = ["He likes dramas and comedies a lot.", "She dislikes horror films.", "Unsure."]
    perm = [2, 0, 1]
    P = prompts * 3 + prompts[:1]
    E = [None] * 3 + expls + [expls[q] for q in perm] + ["A one-off text."]
    T = targets * 3 + targets[:1]
    keys = b.scorer_groups(P, E)
    assert keys[:3] == [("prompt", p) for p in prompts] and keys[-1] == ("prompt", prompts[0])
    for j, e in enumerate(expls):  # read by prompt j and by the prompt that perm sends it to
        assert keys[3 + j] == keys[6 + perm.index(j)] == ("explanation", e)
    seen = []
    real = b.hidden_after_prefix
    monkeypatch.setattr(b, "hidden_after_prefix", lambda pre, suf, own: (
        seen.append((pre, suf)), real(pre, suf, own))[1])
    with torch.inference_mode():
        got = b.scorer_logprobs(P, E, T, batch_size=4)
        with b.use("scorer"):
            sep = torch.cat([b.answer_logprobs([b.scorer_ids(p, e, t)]) for p, e, t in zip(P, E, T)])
    assert torch.allclose(sep, got, atol=2e-5), (sep - got).abs().max()
    texts = [b.tok.decode(x) for pre, _ in seen for x in pre]
    for e in expls:  # its forward runs once, for every input that reads it
        assert sum(f"Explanation: {e}" in t for t in texts) == 1, (e, texts)


def test_prediction_chunks_keep_each_explanations_inputs_together(monkeypatch):
    """stage1_sft.predict_p_chunked cuts the scorer inputs into chunks of whole groups: with one
    prompt per chunk, an explanation read under several permutations is still scored in one call
    (one forward of it), and the result is predict_p's in one call."""
    import parallel
    b = _bundle_with_random_adapters()
    b.scorer_view = "target"
    prompts = [f"liked {c}; disliked {d}.\nTarget item: {c}." for c, d in zip("ABCDEF", "GHIJKL")]
    targets = [f"{c} (Drama)" for c in "ABCDEF"]
    expls = [f"Explanation number {i} of the user." for i in range(6)]
    perms = [[1, 2, 3, 4, 5, 0], [5, 3, 1, 0, 2, 4]]
    variants = [[None] * 6, expls] + [[expls[q] for q in perm] for perm in perms]
    calls = []
    real = b.scorer_logprobs
    monkeypatch.setattr(b, "scorer_logprobs", lambda P, E, T, batch, desc="score": (
        calls.append(E), real(P, E, T, batch, desc))[1])
    with torch.inference_mode():
        got = stage1_sft.predict_p_chunked(parallel.World(), b, prompts, variants, 1, targets)
        chunks = list(calls)
        one = stage1_sft.predict_p(b, prompts, variants, 4, targets)
    assert got.shape == (4, 6) and np.allclose(got, one, atol=2e-5), np.abs(got - one).max()
    assert len(chunks) > 2  # several chunks ...
    for e in expls:  # ... and every explanation's three inputs in one of them
        assert [E.count(e) for E in chunks if e in E] == [3], (e, chunks)


def test_eager_attention_gives_the_same_forwards_and_gradients_and_generates_with_sdpa():
    """--attn eager: the forwards over whole sequences (grouped scoring, log-probs with their
    gradients) equal sdpa's (fp32), and generate() decodes with sdpa, then eager again."""
    s, e = _bundle_with_random_adapters("sdpa"), _bundle_with_random_adapters("eager")
    e.model.load_state_dict(s.model.state_dict())  # (LoRA A is drawn from the global generator)
    assert e.base.config._attn_implementation == "eager" != s.base.config._attn_implementation
    prompts = ["The user liked: A, B.\nTarget item: C.", "liked D; disliked E, F, G.\nTarget: H."]
    expls = ["He will like it.", None, "He will not like it at all."]
    seqs = [s.scorer_ids(p, x) for p in prompts for x in expls]
    pids = [s.explainer_ids(p) for p in prompts for _ in range(2)]
    comps = [s.encode(" He likes it"), s.encode(" no"), s.encode(" yes it is"), s.encode(" He")]
    out = {}
    for name, b in (("sdpa", s), ("eager", e)):
        with b.use("scorer"), torch.inference_mode():
            score = b.answer_logprobs_grouped(seqs, [0] * 3 + [1] * 3, batch_size=4)
        with b.use("explainer"):
            lp = torch.cat(b.completion_logprobs(pids, comps))
            lp.sum().backward()
            grads = [p.grad.clone() for p in b.trainable("explainer")]
            seen = []
            hook = b._parts()[0].layers[0].self_attn.register_forward_pre_hook(
                lambda m, a: seen.append(m.config._attn_implementation))
            text = b.generate(pids[::2], greedy=True, max_new_tokens=4)  # distinct prompts
            hook.remove()
        out[name] = (score, lp.detach(), grads, text, set(seen), b.base.config._attn_implementation)
    (s0, l0, g0, t0, seen0, after0), (s1, l1, g1, t1, seen1, after1) = out["sdpa"], out["eager"]
    assert torch.allclose(s0, s1, atol=1e-5) and torch.allclose(l0, l1, atol=1e-5)
    rel = [float((x - y).norm() / x.norm()) for x, y in zip(g0, g1)]
    assert max(rel) < 1e-4, rel
    assert t0 == t1 and seen1 == {"sdpa"} and after1 == "eager" and seen0 == {"sdpa"}
    with pytest.raises(ExpCTRError, match="--attn flash"):
        llm.LLM("tiny", "float32", attn="flash")


def test_shared_prefill_samples_what_separate_prefill_samples():
    """K copies of a prompt in one generate() batch share its prefill; the draws (same seed) and
    their log-probs are those of a prefill per row."""
    b = _bundle_with_random_adapters()
    batch = [b.explainer_ids(p) for p in ("liked A, B. Target C. Why?", "liked D. Target H.")
             for _ in range(3)]
    out = {}
    with b.use("explainer"):
        for share in (True, False):
            b.share_prefix = share
            assert (b._shared_prefill(batch) is not None) == share
            torch.manual_seed(5)
            out[share] = b.generate(batch, greedy=False, max_new_tokens=8, return_logprobs=True)
    assert out[True][0] == out[False][0]
    for x, y in zip(out[True][1], out[False][1]):
        assert torch.allclose(x, y, atol=2e-5)


def test_scorer_lora_in_top_layers_only_and_saved_that_way(tmp_path):
    b = llm.LLM("tiny", "float32")
    n = b.base.config.num_hidden_layers
    b.attach({"scorer": None}, targets=llm.ALL_PROJ, top_layers=1)
    names = [k for k, _ in b.model.named_parameters() if "lora_A" in k]
    layers = {int(k.split(".layers.")[1].split(".")[0]) for k in names}
    assert layers == {n - 1} and len(names) == len(llm.ALL_PROJ)
    b.save_adapter("scorer", tmp_path / "a")
    b2 = llm.LLM("tiny", "float32")
    b2.attach({"scorer": tmp_path / "a"})
    assert sorted(k for k, _ in b2.model.named_parameters() if "lora_A" in k) == sorted(names)
    with pytest.raises(ExpCTRError, match="top LoRA layers"):
        llm.LLM("tiny", "float32").attach({"scorer": None}, top_layers=n + 1)


def test_scorer_question_names_the_target_and_never_the_label():
    s = {"uid": "1", "iid": "2", "label": 1, "ts": 0, "hist": [["3", 1], ["4", 0]]}
    items = {"2": {"iid": "2", "title": "Heat", "genres": ["Crime"]},
             "3": {"iid": "3", "title": "Up", "genres": ["Comedy", "Crime"]},
             "4": {"iid": "4", "title": "Jaws", "genres": ["Horror"]}}
    for style in common.PROMPT_STYLES:
        text = common.build_scorer_prompt(common.build_prompt(s, items, style), "why",
                                          common.target_text(s, items))
        assert text.endswith("Will the user click Heat (Crime)? Answer Yes or No.")
        assert "label" not in text and "Yes." not in text.split("Answer Yes or No.")[0]
    assert "liked: Comedy (1), Crime (1)." in common.build_prompt(s, items, "genres")
    assert "disliked: Horror (1)." in common.build_prompt(s, items, "genres")


def test_explainer_question_is_a_run_option_every_prompt_uses(tmp_path):
    """data_prep.py --question genres: stored in meta.json, read back by common.prompt_options,
    and the explanations' prompts end with that question; a default run keeps its old meta."""
    d = tmp_path / "run"
    data_prep.main(["--run-dir", str(d), "--dataset", "synthetic", "--n-users", "40", "--n-items",
                    "30", "--n-interactions", "800", "--history-len", "4", "--prompt-style", "genres",
                    "--question", "genres", "--max-samples", "valid=3"])
    P = RunPaths(d)
    assert common.prompt_options(P) == {"style": "genres", "question": "genres"}
    stage2_reward.main(["--run-dir", str(d), "--split", "valid", "--tag", "base", "--model", "tiny",
                        "--dtype", "float32", "--max-new-tokens", "3", "--gen-batch", "4"])
    items = common.load_items(P)
    for row in common.read_jsonl(P.explanations("base", "valid")):
        title = items[row["iid"]]["title"]
        assert row["prompt"].endswith(common.QUESTIONS["genres"].format(title=title))
        assert "liked: " in row["prompt"] and " (" in row["prompt"].split("\n")[0]  # genre counts
    data_prep.main(["--run-dir", str(tmp_path / "old"), "--dataset", "synthetic", "--n-users", "40",
                    "--n-items", "30", "--n-interactions", "800"])
    assert "question" not in common.read_json(RunPaths(tmp_path / "old").meta)["args"]
    assert common.prompt_options(RunPaths(tmp_path / "old"))["question"] == "paper"
    with pytest.raises(ExpCTRError, match="question 'x'"):
        common.build_prompt({"uid": "1", "iid": "2", "hist": []}, {}, question="x")


def test_scorer_target_view_reads_the_explanation_not_the_history(tmp_path):
    """--scorer-view target: beside an explanation the scorer sees the target, not the history;
    without one it reads the full prompt; the view is saved with the adapter and restored."""
    s = {"uid": "1", "iid": "2", "label": 1, "ts": 0, "hist": [["3", 1], ["4", 0]]}
    items = {"2": {"iid": "2", "title": "Heat", "genres": ["Crime"]},
             "3": {"iid": "3", "title": "Up", "genres": ["Comedy", "Crime"]},
             "4": {"iid": "4", "title": "Jaws", "genres": ["Horror"]}}
    prompt, t = common.build_prompt(s, items, "genres"), common.target_text(s, items)
    full = common.build_scorer_prompt(prompt, "He likes crime.", t)
    view = common.build_scorer_prompt(prompt, "He likes crime.", t, view="target")
    assert "liked: Comedy (1), Crime (1)." in full
    assert view == ("Explanation: He likes crime.\nTarget item: Heat (Crime).\n"
                    "Will the user click Heat (Crime)? Answer Yes or No.")
    assert common.build_scorer_prompt(prompt, None, t, view="target") == \
        common.build_scorer_prompt(prompt, None, t)
    with pytest.raises(ExpCTRError, match="scorer view"):
        common.build_scorer_prompt(prompt, "x", t, view="history")
    b = llm.LLM("tiny", "float32")
    b.attach({"scorer": None}, scorer_view="target")
    assert b.scorer_ids(prompt, "He likes crime.", t) == b.encode(b._chat(view, llm.ANSWER_PREFIX))
    b.save_adapter("scorer", tmp_path / "s")
    b2 = llm.LLM("tiny", "float32")
    b2.attach({"scorer": tmp_path / "s"})
    assert b2.scorer_view == "target"
    assert b2.scorer_ids(prompt, "He likes crime.", t) == b.scorer_ids(prompt, "He likes crime.", t)


def test_profile_echo_puts_the_history_lines_in_the_explanation_slot():
    """--profile-echo: a share of the scorer's training samples read the prompt's own history
    lines (never the label) where the explanation goes; the rest keep dropout / explanation."""
    items = {"2": {"iid": "2", "title": "Heat", "genres": ["Crime"]},
             "3": {"iid": "3", "title": "Up", "genres": ["Comedy", "Crime"]},
             "4": {"iid": "4", "title": "Jaws", "genres": ["Horror"]}}
    rows = [{"uid": str(u), "iid": "2", "label": u % 2, "ts": 0, "hist": [["3", 1], ["4", 0]]}
            for u in range(3)]
    ex = [{"explanation": f"text {u}"} for u in range(3)]
    popt = {"style": "genres", "question": "paper"}
    got = stage1_sft.train_texts(rows, ex, items, popt, [0.1, 0.4, 0.9], dropout=0.3, echo=0.35)
    assert got == [None, "The user liked: Comedy (1), Crime (1). The user disliked: Horror (1).", "text 2"]
    assert common.build_prompt(rows[0], items, **popt).startswith(
        common.history_lines(rows[0], items, "genres") + "\nTarget item: Heat (Crime).")
    assert stage1_sft.train_texts(rows, ex, items, popt, [0.1, 0.4, 0.9], 0.3, 0.0) == [None, "text 1", "text 2"]


def test_echo_subsets_state_part_of_the_profile_without_the_label():
    """--echo-subsets: a share of the profile-echo texts keep a random non-empty proper subset of
    the catalogue's genres (the same draws for the same seed, none with share 0); the text counts
    only those genres and does not depend on the label."""
    items = {"2": {"iid": "2", "title": "Heat", "genres": ["Crime"]},
             "3": {"iid": "3", "title": "Up", "genres": ["Comedy", "Crime"]},
             "4": {"iid": "4", "title": "Jaws", "genres": ["Horror"]}}
    genres = ["Comedy", "Crime", "Horror"]
    keep = stage1_sft.genre_subsets(400, genres, 0.5, seed=3)
    assert keep == stage1_sft.genre_subsets(400, genres, 0.5, seed=3)
    assert stage1_sft.genre_subsets(5, genres, 0.0, seed=3) == [None] * 5
    subs = [k for k in keep if k is not None]
    assert 150 < len(subs) < 250 and all(0 < len(k) < 3 and k <= set(genres) for k in subs)
    assert {len(k) for k in subs} == {1, 2}
    rows = [{"uid": str(u), "iid": "2", "label": u % 2, "ts": 0, "hist": [["3", 1], ["4", 0]]}
            for u in range(2)]
    ex = [{"explanation": "x"}] * 2
    popt = {"style": "genres", "question": "paper"}
    got = stage1_sft.train_texts(rows, ex, items, popt, [0.1, 0.1], 0.0, 1.0, [{"Crime"}, {"Crime"}])
    assert got == ["The user liked: Crime (1). The user disliked: none."] * 2   # label 0 and 1
    assert stage1_sft.train_texts(rows, ex, items, popt, [0.1], 0.0, 1.0, [{"Horror", "Comedy"}])[0] \
        == "The user liked: Comedy (1). The user disliked: Horror (1)."
    with pytest.raises(common.ExpCTRError, match="genres"):
        common.history_lines(rows[0], items, "items", {"Crime"})


def test_echo_from_target_states_only_genres_of_the_target():
    """--echo-from target: each chosen subset is a non-empty subset of that sample's own target
    genres (both sizes of a 2-genre target occur), the same for the same seed, independent of the
    label; --echo-from catalogue is genre_subsets over the catalogue as before."""
    items = {"2": {"iid": "2", "title": "Heat", "genres": ["Crime"]},
             "3": {"iid": "3", "title": "Up", "genres": ["Comedy", "Crime"]},
             "4": {"iid": "4", "title": "Jaws", "genres": ["Horror"]},
             "5": {"iid": "5", "title": "Odd", "genres": ["Action", "Drama", "Horror"]}}
    rows = [{"uid": str(u), "iid": "2345"[u % 4], "label": u % 2, "ts": 0, "hist": []}
            for u in range(400)]
    keep = stage1_sft.echo_keep(rows, items, 0.6, 3, "target")
    assert keep == stage1_sft.echo_keep([dict(r, label=1 - r["label"]) for r in rows], items, 0.6, 3,
                                        "target")
    chosen = [(r, k) for r, k in zip(rows, keep) if k is not None]
    assert 190 < len(chosen) < 290
    assert all(k and k <= set(items[r["iid"]]["genres"]) for r, k in chosen)
    assert {len(k) for r, k in chosen if r["iid"] == "3"} == {1, 2}
    assert {len(k) for r, k in chosen if r["iid"] == "5"} == {1, 2, 3}
    catalogue = sorted({g for it in items.values() for g in it["genres"]})
    assert stage1_sft.echo_keep(rows, items, 0.6, 3) == stage1_sft.genre_subsets(400, catalogue, 0.6, 3)


def _scorer_with_top_layer_lora_and_head(seed: int = 0, answer_layer: int = 0) -> llm.LLM:
    """Tiny model, scorer LoRA in the top layer only with random B, and a perturbed answer head."""
    b = llm.LLM("tiny", "float32")
    b.attach({"scorer": None}, targets=llm.ALL_PROJ, top_layers=1, answer_layer=answer_layer)
    b.add_answer_head("scorer")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in b.model.named_parameters():
            if "lora_B.scorer" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        b.heads["scorer"].weight.add_(torch.randn(b.heads["scorer"].weight.shape, generator=g))
        b.heads["scorer"].bias.add_(torch.tensor([0.4, -0.2]))
    return b


@pytest.mark.parametrize("answer_layer", [0, 1])
def test_top_layers_from_cached_lower_states_equal_the_full_forward(answer_layer):
    """stage1_sft --lora-layers N trains on the frozen lower layers' states computed once: the
    top layers run from them must give the full forward's answer log-probs and LoRA/head gradients
    (also when the scorer reads its answer below the top layer, --answer-layer)."""
    b = _scorer_with_top_layer_lora_and_head(answer_layer=answer_layer)
    seqs = [b.scorer_ids("The user liked: A, B.\nTarget item: C.", "He will like it."),
            b.scorer_ids("liked D; disliked E.\nTarget: H.", None, "H (Crime)")]
    params = b.trainable("scorer")
    labels = torch.tensor([1, 0])
    grads = []
    for path in ("full", "cached"):
        with b.use("scorer"):
            lp = (b.answer_logprobs(seqs) if path == "full"
                  else b.upper_answer_logprobs(b.lower_states(seqs, 1, 4), 1))
            loss = stage1_sft.scorer_loss(lp, labels)
        for p in params:
            p.grad = None
        loss.backward()
        grads.append((lp.detach(), [p.grad.clone() for p in params]))
    (lp_full, g_full), (lp_cached, g_cached) = grads
    assert torch.allclose(lp_full, lp_cached, atol=1e-5), (lp_full - lp_cached).abs().max()
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(g_full, g_cached))
    assert any(float(g.abs().sum()) > 0 for g in g_cached)


def test_answer_head_starts_at_the_untuned_answer_is_saved_and_only_the_scorer_uses_it(tmp_path):
    fresh = llm.LLM("tiny", "float32")
    fresh.attach({"scorer": None})
    seqs = [fresh.scorer_ids("liked A. Target B.", None), fresh.scorer_ids("liked C. Target D.", "x")]
    with torch.inference_mode():
        with fresh.use("scorer"):
            before = fresh.answer_logprobs(seqs)
        fresh.add_answer_head("scorer")
        with fresh.use("scorer"):
            assert torch.allclose(fresh.answer_logprobs(seqs), before, atol=1e-6)  # lm rows
    b = _scorer_with_top_layer_lora_and_head()
    with torch.inference_mode():
        with b.use("scorer"):
            trained = b.answer_logprobs(seqs)
            grouped = b.answer_logprobs_grouped(seqs, [0, 1], 4)
        with b.use(None):
            reference = b.answer_logprobs(seqs)
        with b.use("scorer"):  # the scorer's answer is the head's 2-way softmax
            by_hand = torch.log_softmax(b.heads["scorer"](b.hidden(seqs)[0][:, -1].float()), -1)
    assert torch.allclose(trained, by_hand, atol=1e-5)
    assert torch.allclose(trained, grouped, atol=2e-5)
    assert (trained - reference).abs().max() > 0.05  # the head changes the scorer's answer ...
    b.save_adapter("scorer", tmp_path / "s")
    assert (tmp_path / "s" / llm.ANSWER_HEAD_FILE).exists()
    b2 = llm.LLM("tiny", "float32")
    b2.attach({"scorer": tmp_path / "s"})
    with torch.inference_mode():
        with b2.use("scorer"):
            assert torch.allclose(b2.answer_logprobs(seqs), trained, atol=1e-5)
        with b2.use(None):  # ... and never the reference's (nor the explainer's)
            assert torch.allclose(b2.answer_logprobs(seqs), reference, atol=1e-5)


def test_answer_layer_runs_only_the_layers_below_it_and_is_saved(tmp_path):
    """--answer-layer 1 of the 2-layer tiny model: the scorer's answer is read from layer 0's
    output (final norm, head), in the plain and the prefix-shared forward; other adapters and the
    reference still run every layer; a reloaded scorer keeps its answer layer."""
    b = _scorer_with_top_layer_lora_and_head(answer_layer=1)
    b.attach({"explainer": None})
    decoder, _ = b._parts()
    seqs = [b.scorer_ids("liked A. Target B.", None), b.scorer_ids("liked C. Target D.", "why")]
    with torch.inference_mode():
        with b.use("scorer"):
            ids, mask = b.pad_left(seqs)
            h = b._run_layers(decoder.embed_tokens(ids), mask, decoder.layers[:1])
            by_hand = b._yes_no(decoder.norm(h[:, -1]))
            assert torch.allclose(b.answer_logprobs(seqs), by_hand, atol=1e-5)
            assert torch.allclose(b.answer_logprobs_grouped(seqs, [0, 0], 4), by_hand, atol=1e-5)
        for adapter in (None, "explainer"):
            with b.use(adapter):
                full = b.hidden(seqs)[0]
                h2 = b._run_layers(decoder.embed_tokens(ids), mask, decoder.layers)
                assert torch.allclose(full, decoder.norm(h2), atol=1e-5)
    b.save_adapter("scorer", tmp_path / "s")
    b2 = llm.LLM("tiny", "float32")
    b2.attach({"scorer": tmp_path / "s"})
    assert b2.depth == {"scorer": 1}
    with torch.inference_mode(), b2.use("scorer"):
        assert torch.allclose(b2.answer_logprobs(seqs), by_hand, atol=1e-5)
    with pytest.raises(ExpCTRError, match="answer layer"):
        llm.LLM("tiny", "float32").attach({"scorer": None}, answer_layer=3)


def test_sft_on_cached_lower_layers_saves_a_scorer_that_predicts_what_training_measured(tiny_run, tmp_path):
    """stage1_sft with --lora-layers, --answer-layer and a trained answer head (valid scored from
    the cached lower-layer states) and --expl-tag none: the saved scorer, reloaded and run through
    the full forward of predict mode, gives the valid AUC that training logged."""
    d = copy_run(tiny_run, tmp_path / "run")
    P = RunPaths(d)
    shutil.rmtree(P.scorer)
    stage1_sft.main(["--run-dir", str(d), "--model", "tiny", "--dtype", "float32", "--epochs", "2",
                     "--batch-size", "4", "--lr", "1e-2", "--expl-tag", "none", "--lora-targets",
                     "all", "--answer-layer", "1", "--lora-layers", "1", "--answer-head", "trained",
                     "--eval-every", "1", "--scorer-view", "target", "--profile-echo", "0.5"])
    m = common.read_json(P.scorer / "metrics.json")
    assert m["answer_layer"] == 1 and (P.scorer / llm.ANSWER_HEAD_FILE).exists()
    assert m["scorer_view"] == "target" == common.read_json(P.scorer / "expctr.json")["scorer_view"]
    assert m["profile_echo"] == 0.5 and isinstance(m["valid_auc_profile_echo"], float)
    assert m["valid_auc_with_expl"] == m["valid_auc_no_expl"]  # no explanations anywhere
    curve = [r for r in common.read_jsonl(P.metrics) if r["stage"] == "stage1_sft_curve"]
    assert curve and [r["samples"] for r in curve] == sorted(r["samples"] for r in curve)
    stage1_sft.main(["--run-dir", str(d), "--model", "tiny", "--dtype", "float32",
                     "--predict", "none", "--split", "valid"])
    rows = common.read_jsonl(P.scorer / "preds_valid_none.jsonl")
    got = metrics.auc([r["label"] for r in rows], [r["p"] for r in rows])
    assert abs(got - m["valid_auc_no_expl"]) < 1e-9


def test_reward_templates_cut_every_statement_to_the_same_budget():
    """scripts/reward_templates.py: under --budget the cause and the wrong genre are cut like the
    profile (a one-genre statement is longer than a 16-token budget on the planted world), and
    'cause' / 'other' state the planted cause / another genre of the target."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import reward_templates
    items = {"2": {"iid": "2", "title": "Heat", "genres": ["Crime", "Comedy"]},
             "3": {"iid": "3", "title": "Up", "genres": ["Comedy", "Crime"]},
             "4": {"iid": "4", "title": "Jaws", "genres": ["Horror"]}}
    s = {"uid": "1", "iid": "2", "label": 1, "ts": 0, "cause": "Crime", "hist": [["3", 1], ["4", 0]]}
    popt = {"style": "genres", "question": "paper"}
    cut = lambda text: text[:20]
    t = reward_templates.templates(s, items, popt, cut)
    assert t["cause"] == "The user liked: Crime (1). The user disliked: none."
    assert t["other"] == "The user liked: Comedy (1). The user disliked: none."
    assert t["none"] is None and "Horror" in t["profile"]
    assert (t["profile_cut"], t["target_genres_cut"], t["cause_cut"], t["other_cut"]) == \
        (cut(t["profile"]), cut(t["target_genres"]), cut(t["cause"]), cut(t["other"]))
    assert "cause_cut" not in reward_templates.templates(s, items, popt)


def test_explainer_form_generates_each_prompt_variant_and_keeps_its_prefix(tiny_run, monkeypatch, capsys):
    """scripts/explainer_form.py: each variant's question ends the prompt and its assistant prefix
    starts the assistant turn and the explanation; rows are explanation_quality.cause_choice's;
    test is refused."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "explainer_form", Path(__file__).resolve().parents[1] / "scripts" / "explainer_form.py")
    ef = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ef)
    seen, real = [], llm.LLM.explainer_ids
    monkeypatch.setattr(llm.LLM, "explainer_ids",
                        lambda self, prompt, prefix="": seen.append((prompt, prefix)) or real(self, prompt, prefix))
    b = llm.LLM("tiny", "float32")
    assert b.explainer_ids("x", "The genre is")[-len(b.encode(" is")):] == b.encode(" is")
    seen.clear()
    out = ef.main(["--run-dir", str(tiny_run), "--model", "tiny", "--dtype", "float32",
                   "--max-new-tokens", "3", "--n-boot", "20", "--max-targets", "2",
                   "--variant", "genres", "--variant", "cause|The genre that decides is"])
    items = common.load_items(RunPaths(tiny_run))
    valid = common.load_split(RunPaths(tiny_run), "valid")
    titles = [items[s["iid"]]["title"] for s in valid
              if s.get("cause") and len(items[s["iid"]]["genres"]) >= 2][:2]
    n = len(titles)
    assert n > 0 and len(seen) == 2 * n and out["genres|"]["n"] == n
    for (p, pre), t in zip(seen[:n], titles):
        assert pre == "" and p.endswith(common.QUESTIONS["genres"].format(title=t))
    for (p, pre), t in zip(seen[n:], titles):
        assert pre == "The genre that decides is" and p.endswith(common.QUESTIONS["cause"].format(title=t))
    assert all(e.startswith("The genre that decides is") for e in out["cause|The genre that decides is"]["examples"])
    assert set(out) == {"genres|", "cause|The genre that decides is", "echo_first_genre"}
    assert "| cause | 'The genre that decides is' |" in capsys.readouterr().out
    with pytest.raises(ExpCTRError, match="--split test: refused"):
        ef.main(["--run-dir", str(tiny_run), "--model", "tiny", "--split", "test"])
    with pytest.raises(ExpCTRError, match="question 'nope'"):
        ef.main(["--run-dir", str(tiny_run), "--model", "tiny", "--variant", "nope|x"])


def test_bench_rollouts_predictions_times_both_groupings(tiny_run, tmp_path):
    """scripts/bench_rollouts.py --predictions runs the predictions step's scorer pass grouped
    both ways on a run folder and prints the table; the two groupings give the same p(click)."""
    import subprocess
    import sys
    run = copy_run(tiny_run, tmp_path / "run")
    paths = RunPaths(run)
    rows = common.load_split(paths, "test")
    paths.explanations("base", "test").parent.mkdir(parents=True)
    common.write_jsonl(paths.explanations("base", "test"), (
        {"uid": r["uid"], "iid": r["iid"], "label": r["label"], "explanation": f"Text {i % 3}."}
        for i, r in enumerate(rows)))
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_rollouts.py"
    out = subprocess.run([sys.executable, str(script), "--run-dir", str(run), "--predictions",
                          "--prompts", "4", "--tags", "base", "--shuffles", "2", "--repeats", "1",
                          "--model", "tiny", "--dtype", "float32"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    out = out.stdout
    assert "4 test prompts x 4 scorer inputs" in out, out
    assert float(out.split("max |p difference| ")[1].split()[0]) < 1e-4, out
    assert [line.split(" | ")[0] for line in out.splitlines() if line.startswith("| ")][1:] == \
        ["| by prompt (before)", "| scorer_groups", "| speed-up"], out
