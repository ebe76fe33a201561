"""train_ctr.py: models train and round-trip, ExpCTR-Aug text input and warm start, no label
leakage from valid/test, determinism, one-line errors, the synthetic world is learnable."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
import ctr_models  # noqa: E402
import data_prep  # noqa: E402
import train_ctr  # noqa: E402

FAST = ["--epochs", "2", "--batch-size", "256"]


def train(run, *args):
    train_ctr.main(["--run-dir", str(run), *map(str, args)])


def saved_preds(run, name, split="test"):
    return np.array([r["p"] for r in common.read_jsonl(Path(run) / "ctr" / name / f"preds_{split}.jsonl")])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    r = tmp_path_factory.mktemp("ctr") / "run"
    data_prep.main(["--run-dir", str(r), "--dataset", "synthetic", "--n-users", "60",
                    "--n-items", "40", "--n-interactions", "3000", "--history-len", "5"])
    rng = np.random.default_rng(0)
    for s in common.SPLITS:  # fake explanation embeddings in both supported formats
        rows = common.load_split(common.RunPaths(r), s)
        emb = rng.normal(size=(len(rows), 8)).astype(np.float32)
        np.save(r / f"emb_{s}.npy", emb)
        common.write_jsonl(r / f"emb_{s}.jsonl", ({"uid": x["uid"], "iid": x["iid"], "ts": x["ts"],
                                                   "emb": e.tolist()} for x, e in zip(rows, emb)))
    return r


@pytest.mark.parametrize("model", ["deepfm", "dcnv2", "din", "popularity", "logreg"])
def test_train_and_round_trip(run, model):
    train(run, "--model", model, *FAST)
    out = run / "ctr" / model
    m = common.read_json(out / "metrics.json")
    assert m["model"] == model and m["text_emb"] is None and m["init_from"] is None
    for split in ("valid", "test"):
        assert set(m[split]) == {"auc", "logloss", "gauc", "n"} and m[split]["auc"] <= 1
    # every model learns the planted signal after 2 epochs: mean valid/test AUC >= 0.56 (measured
    # 0.57-0.61; the oracle reaches 0.87; chance is 0.50 +- 0.02 at n = 186 per split)
    assert (m["valid"]["auc"] + m["test"]["auc"]) / 2 >= 0.56, (m["valid"], m["test"])
    p = ctr_models.load_checkpoint(out)
    assert p.model_name == model and p.text_dim == 0
    test = common.load_split(common.RunPaths(run), "test")
    got = p.predict(test)
    assert got.dtype == np.float64 and got.shape == (len(test),)
    np.testing.assert_allclose(got, saved_preds(run, model), rtol=0, atol=1e-6)
    assert np.allclose(p.predict(test[:7]), got[:7], atol=1e-6)  # batch-size independent
    logged = [r for r in common.read_jsonl(run / "metrics.jsonl") if r.get("model") == model]
    assert logged and logged[-1].get("final")
    if model in ctr_models.TORCH_MODELS:
        assert [r["epoch"] for r in logged if "epoch" in r][-2:] == [1, 2]
        assert "valid_auc" in logged[0]


@pytest.mark.parametrize("model", ["deepfm", "dcnv2", "din"])
def test_text_emb_and_warm_start(run, model):
    if not (run / "ctr" / model / "model.pt").exists():
        train(run, "--model", model, *FAST)
    id_pred = ctr_models.load_checkpoint(run / "ctr" / model)
    # warm start: an Aug net initialised from the ID net predicts what the ID net predicted
    cfg = dict(id_pred.cfg, text_dim=8)
    net = ctr_models.build_net(cfg)
    n = train_ctr.warm_start(net, id_pred.ckpt["state_dict"], cfg)
    assert n == len(id_pred.ckpt["state_dict"])
    test = common.load_split(common.RunPaths(run), "test")
    emb = np.load(run / "emb_test.npy")
    feats = ctr_models.Features(ctr_models.ctr_features.as_arrays(test), id_pred.vocab)
    aug0 = ctr_models.predict_net(net, feats, torch.from_numpy(emb), 512)
    np.testing.assert_allclose(aug0, id_pred.predict(test), atol=1e-6)  # DeepFM's FM term too
    # trained Aug model round-trips, with text from .npy or from .jsonl
    train(run, "--model", model, "--out-name", f"{model}_aug", "--text-emb",
          str(run / "emb_{split}.npy"), "--init-from", run / "ctr" / model, *FAST)
    p = ctr_models.load_checkpoint(run / "ctr" / f"{model}_aug")
    assert p.text_dim == 8 and p.model_name == model
    np.testing.assert_allclose(p.predict(test, emb), saved_preds(run, f"{model}_aug"), atol=1e-6)
    m = common.read_json(run / "ctr" / f"{model}_aug" / "metrics.json")
    assert m["text_emb"].endswith("emb_{split}.npy") and m["init_from"]
    with pytest.raises(common.ExpCTRError):
        p.predict(test)  # text required
    if model == "din":
        train(run, "--model", model, "--out-name", "din_aug_jsonl", "--text-emb",
              str(run / "emb_{split}.jsonl"), "--init-from", run / "ctr" / model, *FAST)
        a = common.read_json(run / "ctr" / "din_aug" / "metrics.json")
        b = common.read_json(run / "ctr" / "din_aug_jsonl" / "metrics.json")
        assert a["test"] == b["test"]


def test_determinism_and_skip(run, capsys):
    for name in ("det_a", "det_b"):
        train(run, "--model", "din", "--out-name", name, *FAST)
    a = common.read_json(run / "ctr/det_a/metrics.json")
    b = common.read_json(run / "ctr/det_b/metrics.json")
    for k in ("valid", "test", "best_epoch"):
        assert a[k] == b[k]
    assert saved_preds(run, "det_a").tolist() == saved_preds(run, "det_b").tolist()
    train(run, "--model", "din", "--out-name", "det_a", *FAST)
    assert "skip" in capsys.readouterr().out
    train(run, "--model", "din", "--out-name", "det_c", "--seed", "1", *FAST)
    assert common.read_json(run / "ctr/det_c/metrics.json")["test"] != a["test"]


def flipped_copy(run: Path, dest: Path, splits) -> Path:
    (dest / "data").mkdir(parents=True)
    for f in (run / "data").iterdir():
        shutil.copy(f, dest / "data" / f.name)
    for s in splits:
        rows = common.load_split(common.RunPaths(dest), s)
        for r in rows:
            r["label"] = 1 - r["label"]
        common.write_jsonl(dest / "data" / f"{s}.jsonl", rows)
    return dest


def state(path):
    return torch.load(path / "model.pt", weights_only=True)["state_dict"]


def test_eval_labels_never_train(run, tmp_path):
    # flipping every test label changes nothing about the model or its valid predictions
    flip = flipped_copy(run, tmp_path / "flip_test", ["test"])
    for r in (run, flip):
        train(r, "--model", "deepfm", "--out-name", "leak", *FAST)
    sa, sb = state(run / "ctr/leak"), state(flip / "ctr/leak")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert saved_preds(run, "leak", "valid").tolist() == saved_preds(flip, "leak", "valid").tolist()
    # flipping valid labels too: with one epoch (no model selection) the weights are identical
    flip2 = flipped_copy(run, tmp_path / "flip_all", ["valid", "test"])
    for r in (run, flip2):
        train(r, "--model", "din", "--out-name", "leak1", "--epochs", "1")
    sa, sb = state(run / "ctr/leak1"), state(flip2 / "ctr/leak1")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # popularity uses train labels only
    for r in (run, flip2):
        train(r, "--model", "popularity", "--out-name", "pop_leak")
    assert saved_preds(run, "pop_leak").tolist() == saved_preds(flip2, "pop_leak").tolist()


def test_text_emb_row_mismatch_is_one_line(run, tmp_path):
    np.save(tmp_path / "bad_train.npy", np.zeros((3, 8), np.float32))
    res = subprocess.run([sys.executable, str(ROOT / "train_ctr.py"), "--run-dir", str(run),
                          "--model", "din", "--out-name", "bad", "--text-emb",
                          str(tmp_path / "bad_{split}.npy")], capture_output=True, text=True, cwd=ROOT)
    lines = res.stderr.strip().splitlines()
    n_train = len(common.load_split(common.RunPaths(run), "train"))
    assert res.returncode != 0 and len(lines) == 1, res.stderr
    assert "bad_train.npy" in lines[0] and f"expected {n_train} rows" in lines[0]
    assert not (run / "ctr" / "bad").exists()


def test_evaluate_predictions_gauc():
    y = [1, 0, 1, 0, 1, 1, 0]
    p = [0.9, 0.1, 0.2, 0.8, 0.5, 0.6, 0.7]
    u = ["a", "a", "b", "b", "c", "c", "c"]
    m = train_ctr.evaluate_predictions(y, p, u)
    # users: a auc 1 (2 imps), b auc 0 (2 imps), c auc 0 (3 imps) -> (2*1 + 0 + 0) / 7
    assert m["gauc"] == pytest.approx(2 / 7) and m["n"] == 7
    assert 0 < m["auc"] < 1 and m["logloss"] > 0


def test_synthetic_world_is_learnable(tmp_path):
    """The planted signal is strong enough for DIN (default synthetic world)."""
    r = tmp_path / "syn"
    data_prep.main(["--run-dir", str(r), "--dataset", "synthetic"])
    train(r, "--model", "din", "--epochs", "12")
    m = common.read_json(r / "ctr/din/metrics.json")
    assert m["test"]["auc"] > 0.75, m["test"]


@pytest.mark.parametrize("model", ["din", "popularity"])
def test_eval_only_transfer(run, tmp_path, model):
    """--epochs 0 --init-from: a checkpoint trained elsewhere is scored on this run's splits
    without training (how the quick preset scores the full-data ID models on its subset)."""
    if not (run / "ctr" / model / "model.pt").exists():
        train(run, "--model", model, *FAST)
    other = tmp_path / "other"
    shutil.copytree(run / "data", other / "data")
    train(other, "--model", model, "--epochs", "0", "--init-from", run / "ctr" / model)
    np.testing.assert_allclose(saved_preds(other, model), saved_preds(run, model), atol=1e-9)
    m = common.read_json(other / "ctr" / model / "metrics.json")
    assert m["epochs_run"] == 0 and m["init_from"] == str(run / "ctr" / model)
    with pytest.raises(common.ExpCTRError, match="--epochs 0"):
        train(other, "--model", model, "--epochs", "0", "--force")


def test_warm_start_never_worse_on_valid(run):
    """The warm-started state is an early-stopping candidate (epoch 0): with a tiny lr-blowup
    fine-tune, the kept model's valid AUC is at least the starting model's."""
    if not (run / "ctr" / "din" / "model.pt").exists():
        train(run, "--model", "din", *FAST)
    start = common.read_json(run / "ctr" / "din" / "metrics.json")["valid"]["auc"]
    train(run, "--model", "din", "--init-from", run / "ctr" / "din", "--out-name", "din_ft",
          "--lr", "1.0", "--epochs", "1", "--patience", "1")
    m = common.read_json(run / "ctr" / "din_ft" / "metrics.json")
    assert m["valid"]["auc"] >= start - 1e-9


@pytest.mark.parametrize("model", ["deepfm", "dcnv2", "din"])
def test_every_backbone_reads_the_history_labels_and_emb_reg_applies(run, model):
    """The same feature set for every backbone: the history-label field (the liked/disliked
    sign embeddings) reaches each model's output; --emb-reg adds the FuxiCTR L2 term."""
    import ctr_features
    P = common.RunPaths(run)
    arr = train_ctr.load_split_arrays(P, "train")
    vocab = ctr_features.build_vocab(arr, common.load_items(P), ["age", "gender"])
    cfg = {"model": model, "emb_dim": 8, "mlp": "16", "dropout": 0.0, "text_dim": 0,
           "n_uid": len(vocab["uid"]), "n_iid": len(vocab["iid"]), "n_genre": len(vocab["genre"]),
           "n_field": [len(vocab["field"][f]) for f in vocab["user_fields"]]}
    torch.manual_seed(0)
    net = ctr_models.build_net(cfg)
    b = ctr_features.Features(arr, vocab).batch(np.arange(64))
    net(b).sum().backward()
    assert net.sign.weight.grad[1:].abs().sum() > 0  # disliked / liked rows
    pen = train_ctr.embedding_penalty(net, 0.1)
    want = 0.05 * sum((m.weight ** 2).sum() for m in net.modules() if isinstance(m, torch.nn.Embedding))
    assert torch.allclose(pen, want) and pen > 0


def din_reference(net, b):
    """DIN as written (Zhou et al. 2018): the attention unit reads the concatenation
    [q, k, q-k, q*k, sign] of every history slot; the signs pooled by the same weights."""
    gm = net.genre_means(b)
    ids = net.id_fields(b, gm)
    hk, sign, mask = net.history_items(b, gm), net.sign(b["hlab"]), (b["hlab"] > 0).float()
    q = (ids[1] + ids[2]).unsqueeze(1).expand_as(hk)
    w = net.att(torch.cat([q, hk, q - hk, q * hk, sign], -1)).squeeze(-1) * mask
    hist = [(w.unsqueeze(-1) * hk).sum(1), (w.unsqueeze(-1) * sign).sum(1)]
    return net.out(net.deep(torch.cat(net.all_fields(ids, hist, None), -1))).squeeze(-1)


def test_din_attention_by_parts_equals_the_concatenated_unit(run):
    """DIN.forward splits the unit's first layer to skip the per-slot query and the sign
    concatenation: same function, same parameters, same gradients as the paper's form."""
    import ctr_features
    P = common.RunPaths(run)
    arr = train_ctr.load_split_arrays(P, "train")
    vocab = ctr_features.build_vocab(arr, common.load_items(P), ["age", "gender"])
    cfg = {"model": "din", "emb_dim": 8, "mlp": "16", "dropout": 0.0, "text_dim": 0,
           "n_uid": len(vocab["uid"]), "n_iid": len(vocab["iid"]), "n_genre": len(vocab["genre"]),
           "n_field": [len(vocab["field"][f]) for f in vocab["user_fields"]]}
    torch.manual_seed(0)
    net = ctr_models.build_net(cfg).double()
    for p in net.parameters():  # non-trivial values everywhere (pads too: masking must hold)
        p.data.normal_(0, 0.3)
    b = ctr_features.Features(arr, vocab).batch(np.arange(128))
    assert (b["hlab"] == 0).any() and (b["hlab"] == 1).any() and (b["hlab"] == 2).any()
    got, want = net(b), din_reference(net, b)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    g1 = torch.autograd.grad(got.sum(), list(net.parameters()))
    g2 = torch.autograd.grad(din_reference(net, b).sum(), list(net.parameters()))
    for a, c in zip(g1, g2):
        torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("padding_idx", [None, 0])
def test_embedding_by_index_select_equals_nn_embedding(padding_idx):
    """ctr_models.Embedding (index_select lookups, for a faster backward) gives nn.Embedding's
    values and gradients, including none to the padding row."""
    torch.manual_seed(0)
    ref = torch.nn.Embedding(7, 4, padding_idx=padding_idx).double()
    ref.weight.data.normal_()  # a non-zero padding row too: no gradient may reach it
    ours = ctr_models.Embedding(7, 4, padding_idx=padding_idx).double()
    ours.load_state_dict(ref.state_dict())
    idx = torch.tensor([[0, 3, 3, 6], [1, 0, 2, 3]])
    out_r, out_o = ref(idx), ours(idx)
    w = torch.randn(out_r.shape, dtype=torch.float64)
    (out_r * w).sum().backward()
    (out_o * w).sum().backward()
    if padding_idx is None:
        torch.testing.assert_close(out_o, out_r, rtol=0, atol=0)
    else:  # nn.Embedding reads the padding row's weight; ours reads 0 (the row is 0 in training)
        keep = (idx != padding_idx).unsqueeze(-1)
        torch.testing.assert_close(out_o, out_r * keep, rtol=0, atol=0)
        assert ours.weight.grad[padding_idx].abs().sum() == 0
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-12, atol=1e-12)


def test_bench_ctr_train_runs_every_variant(run):
    """scripts/bench_ctr_train.py (a benchmark, not a timed test) runs end to end on a small
    run folder and prints one row per variant; nothing here checks a speed."""
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_ctr_train.py"),
                          "--run-dir", str(run), "--threads", "1", "--batch", "32",
                          "--big-batch", "64", "--steps", "1", "--warmup", "1", "--rounds", "1"],
                         capture_output=True, text=True, check=True).stdout
    rows = [line for line in out.splitlines() if line.startswith("| ") and "x |" in line]
    assert len(rows) == 8 and "| 1.00x |" in rows[0], out
    one = "1.000x [1.000x, 1.000x]"
    assert rows[3].split(" | ")[3] == one and rows[5].endswith(f"| {one} |"), out  # each row paired with itself


def test_bench_ctr_train_profile_reports_each_phase_and_the_matmul_share(run):
    """bench_ctr_train.py --profile: the four phases of a step and the matrix products' share,
    the bound it gives (1 / share), and the time of each numba kernel in unprofiled steps;
    nothing here checks a speed."""
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_ctr_train.py"),
                          "--run-dir", str(run), "--threads", "1", "--batch", "32",
                          "--warmup", "1", "--profile", "2"],
                         capture_output=True, text=True, check=True).stdout
    share = {line.split(" | ")[0][2:]: float(line.split(" | ")[1].rstrip("% |")) / 100
             for line in out.splitlines() if line.startswith("| ") and line.endswith("% |")}
    phases = ("batch gathering", "forward and loss", "backward", "Adam")
    for phase in phases:
        assert 0 < share[phase] < 1, out
    assert 0.9 < sum(share[p] for p in phases) < 1.02, out  # the phases cover the step
    mm = next(v for k, v in share.items() if k.startswith("matrix products"))
    assert 0 < mm < 1
    bound = float(out.split("would be at most ")[1].split("x")[0])
    assert abs(bound - 1 / mm) < 0.1 * bound + 0.05, out
    kernels = {line.split(" | ")[0][2:]: float(line.split(" | ")[1].rstrip(" |"))
               for line in out.split("| numba kernel |")[1].splitlines()[2:] if line.startswith("| ")}
    for k in ("ctr_ops._din_head_forward", "ctr_ops._din_head_backward", "ctr_ops._din_item_grads",
              "ctr_features._batch_columns"):  # each numba kernel a DIN step calls, timed
        assert kernels[k] > 0, out
    step_ms = float(out.split("without the profiler: ")[1].split(" ms")[0])
    in_kernels = float(out.split("of which in numba kernels ")[1].split(" ms")[0])
    assert abs(in_kernels - sum(kernels.values())) < 0.01 + 0.01 * in_kernels and in_kernels < step_ms, out


def test_bench_ctr_train_gather_times_both_gatherers(run):
    """bench_ctr_train.py --gather: one row per gatherer (the last commit's numpy indexing and
    today's numba kernel); nothing here checks a speed."""
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_ctr_train.py"),
                          "--run-dir", str(run), "--threads", "1", "--big-batch", "16",
                          "--steps", "2", "--rounds", "1", "--gather"],
                         capture_output=True, text=True, check=True).stdout
    rows = [line for line in out.splitlines() if line.startswith("| ") and " ms " not in line
            and "---" not in line]
    assert len(rows) == 2 and "numpy" in rows[0] and "numba" in rows[1], out


@pytest.mark.parametrize("model", ["deepfm", "dcnv2", "din"])
def test_tower_dtype_bfloat16_is_the_float32_tower_to_bf16_rounding(run, model):
    """--tower-dtype bfloat16: the same net to bf16 rounding (output and gradients), with
    float32 weights and gradients, the products really in bf16 (not bit-equal to float32),
    and an update far below bf16's resolution still lands in the weights."""
    import ctr_features
    P = common.RunPaths(run)
    arr = train_ctr.load_split_arrays(P, "train")
    vocab = ctr_features.build_vocab(arr, common.load_items(P), ["age", "gender"])
    cfg = {"model": model, "emb_dim": 8, "mlp": "32,16", "dropout": 0.0, "text_dim": 0,
           **ctr_models.vocab_sizes(vocab)}
    torch.manual_seed(0)
    ref = ctr_models.build_net(cfg)
    net = ctr_models.build_net({**cfg, "tower_dtype": "bfloat16"})
    net.load_state_dict(ref.state_dict())
    b = ctr_features.Features(arr, vocab).batch(np.arange(128))
    got, want = net(b), ref(b)
    assert not torch.equal(got, want)
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.02 * want.abs().max().item())
    g1 = torch.autograd.grad(got.sum(), list(net.parameters()))
    g2 = torch.autograd.grad(want.sum(), list(ref.parameters()))
    assert all(a.dtype == torch.float32 for a in g1)
    flat = lambda g: torch.cat([x.reshape(-1) for x in g])
    assert (flat(g1) - flat(g2)).norm() <= 0.05 * flat(g2).norm()
    for a, c in zip(g1, g2):  # (a sum over many slots, e.g. the PReLU slope's, cancels more)
        assert (a - c).norm() <= 0.15 * c.norm() + 1e-6
    for a, c in zip(net.parameters(), ref.parameters()):  # the forward left the weights as they were
        assert torch.equal(a, c)
    w = net.deep[0].weight
    before = w.detach().clone()
    with torch.no_grad():
        w.add_(1e-6)  # ~1e-4 of a weight: below bf16's 8 bits, kept by the fp32 master weight
    net(b)  # and the next forward does not round it away
    assert w.dtype == torch.float32 and not torch.equal(w, before)
