"""ctr_ops.py and the fast CTR training step against their torch references (float64): the numba
kernels (ReLU + dropout; DIN's PReLU + Linear(H, 1) head) and the torch twin of the head (values
and every gradient), the same results for any thread count, the batch's float sign one-hot and
distinct-item ids, and the embedding L2 as Adam's weight decay."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
import ctr_features  # noqa: E402
import ctr_models  # noqa: E402
import ctr_ops  # noqa: E402
import data_prep  # noqa: E402
import train_ctr  # noqa: E402


@pytest.fixture(scope="module")
def feats(tmp_path_factory):
    r = tmp_path_factory.mktemp("ops") / "run"
    data_prep.main(["--run-dir", str(r), "--dataset", "synthetic", "--n-users", "40",
                    "--n-items", "30", "--n-interactions", "1500", "--history-len", "5"])
    P = common.RunPaths(r)
    arr = train_ctr.load_split_arrays(P, "train")
    vocab = ctr_features.build_vocab(arr, common.load_items(P), ["age", "gender"])
    return ctr_features.Features(arr, vocab), vocab


def test_prelu_linear_equals_prelu_then_linear_values_and_gradients():
    torch.manual_seed(0)
    pre = torch.randn(6, 5, 7, dtype=torch.float64, requires_grad=True)
    act, lin = torch.nn.PReLU().double(), torch.nn.Linear(7, 1).double()
    act.weight.data.fill_(0.3)
    ours = ctr_ops.prelu_linear(pre, act.weight, lin.weight, lin.bias)
    ref = lin(act(pre)).squeeze(-1)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    args = [pre, act.weight, lin.weight, lin.bias]
    for a, b in zip(torch.autograd.grad(ours, args, g), torch.autograd.grad(ref, args, g)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(ctr_ops.prelu_linear, args)


def test_attention_head_kernel_equals_its_torch_twin_values_and_gradients():
    """The numba head on P [B, K, H] + Q [B, H] is prelu_linear(P + Q[:, None]) (itself held to
    PReLU + Linear above): float64 to 1e-12, float32 to float32 rounding, in any thread count."""
    torch.manual_seed(0)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-5)):
        P = torch.randn(37, 6, 9, dtype=dtype, requires_grad=True)  # 37: uneven PARTS chunks
        Q = torch.randn(37, 9, dtype=dtype, requires_grad=True)
        a = torch.tensor([0.2], dtype=dtype, requires_grad=True)
        w = torch.randn(1, 9, dtype=dtype, requires_grad=True)
        b = torch.randn(1, dtype=dtype, requires_grad=True)
        args = [P, Q, a, w, b]
        ours = ctr_ops.attention_head(*args)
        ref = ctr_ops.prelu_linear(P + Q.unsqueeze(1), a, w, b)
        torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)
        g = torch.randn_like(ref)
        got = torch.autograd.grad(ours, args, g)
        for x, y in zip(got, torch.autograd.grad(ref, args, g)):
            torch.testing.assert_close(x, y, rtol=10 * tol, atol=10 * tol)
        n = numba.get_num_threads()
        try:
            numba.set_num_threads(1)
            one = [ctr_ops.attention_head(*args), *torch.autograd.grad(ctr_ops.attention_head(*args), args, g)]
        finally:
            numba.set_num_threads(n)
        for x, y in zip(one, [ours, *got]):
            assert torch.equal(x, y)  # bit for bit: the sums do not depend on the threads


def test_relu_dropout_kernel_without_dropout_is_relu_and_its_gradient():
    torch.manual_seed(0)
    x = torch.randn(50, 9, dtype=torch.float64, requires_grad=True)
    for p, training in ((0.0, True), (0.4, False)):
        y = ctr_ops.relu_dropout(x, p, training)
        torch.testing.assert_close(y, torch.relu(x), rtol=0, atol=0)
        g = torch.randn_like(x)
        torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], g * (x > 0), rtol=0, atol=0)


def test_relu_dropout_is_inverted_dropout_of_the_relu_seeded_by_torch():
    """The numba kernel: every unit is 0 or relu(x) / (1 - p); about 1 - p of the positive units
    are kept; the gradient is the same mask; torch.manual_seed fixes the mask, for any thread
    count."""
    p = 0.3
    x = torch.randn(400, 250, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(1)
    y = ctr_ops.relu_dropout(x, p, True)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / (1 - p), rtol=1e-12, atol=0)
    assert (x[kept] > 0).all()
    share = kept.sum().item() / (x > 0).sum().item()
    n = (x > 0).sum().item()
    assert abs(share - (1 - p)) < 4 * (p * (1 - p) / n) ** 0.5, share  # 4 standard errors
    g = torch.randn_like(x)
    torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], g * kept / (1 - p), rtol=1e-12, atol=0)
    torch.manual_seed(1)
    assert torch.equal(ctr_ops.relu_dropout(x, p, True), y)
    assert not torch.equal(ctr_ops.relu_dropout(x, p, True), y)  # the next call: another mask
    n = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        torch.manual_seed(1)
        assert torch.equal(ctr_ops.relu_dropout(x, p, True), y)  # whatever the thread count
    finally:
        numba.set_num_threads(n)


def test_relu_dropout_torch_twin_under_bf16_is_relu_then_dropout():
    x = torch.randn(64, 8).bfloat16()
    torch.testing.assert_close(ctr_ops.relu_dropout(x, 0.5, False), torch.relu(x), rtol=0, atol=0)
    y = ctr_ops.relu_dropout(x, 0.5, True)
    kept = y != 0
    torch.testing.assert_close(y[kept], (x[kept] * 2).bfloat16(), rtol=0, atol=0)


def test_batch_sign_one_hot_and_distinct_items_match_the_integer_fields(feats):
    f, _ = feats
    b = f.batch(np.arange(len(f)))
    hl = b["hlab"]
    assert b["hsign"].dtype == torch.float32 and b["hsign"].shape == (*hl.shape, 2)
    assert torch.equal(b["hsign"][..., 0], (hl == 1).float())  # disliked
    assert torch.equal(b["hsign"][..., 1], (hl == 2).float())  # liked
    assert torch.equal(b["uitem"][b["tpos"]], b["iid"])
    assert torch.equal(b["uitem"][b["hpos"]], b["hid"])


def test_distinct_is_np_unique_with_inverse():
    rng = np.random.default_rng(0)
    for n, size in ((1, 5), (7, 3), (50, 400), (9000, 40000)):
        codes = rng.integers(0, n, size)
        codes[0] = n - 1  # the padding code (the last) occurs
        want_u, want_i = np.unique(codes, return_inverse=True)
        got_u, got_i = ctr_features.distinct(codes, n)
        assert np.array_equal(got_u, want_u) and np.array_equal(got_i, want_i)


def test_emb_reg_as_weight_decay_is_the_l2_penalty_update(feats):
    """make_optimizer's weight decay on the embedding tables takes the step that Adam takes on
    log loss + embedding_penalty (the form train_net used before): same parameters after 3
    steps, for each backbone."""
    f, vocab = feats
    b = f.batch(np.arange(64))
    y = torch.from_numpy(f.labels[:64]).double()
    for model in ctr_models.TORCH_MODELS:
        cfg = {"model": model, "emb_dim": 8, "mlp": "16", "dropout": 0.0, "text_dim": 0,
               **ctr_models.vocab_sizes(vocab)}
        torch.manual_seed(0)
        ref = ctr_models.build_net(cfg).double()
        ours = ctr_models.build_net(cfg).double()
        ours.load_state_dict(ref.state_dict())
        args = argparse.Namespace(lr=1e-2, weight_decay=1e-3, emb_reg=0.05)
        opt_ref = torch.optim.Adam(ref.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        opt = train_ctr.make_optimizer(ours, args)
        for _ in range(3):
            for net, o, pen in ((ref, opt_ref, True), (ours, opt, False)):
                o.zero_grad()
                loss = torch.nn.functional.binary_cross_entropy_with_logits(net(b), y)
                if pen:
                    loss = loss + train_ctr.embedding_penalty(net, args.emb_reg)
                loss.backward()
                o.step()
        for (k, a), c in zip(ours.state_dict().items(), ref.state_dict().values()):
            torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-11, msg=f"{model} {k}")
        assert not torch.equal(ours.user.weight, ctr_models.build_net(cfg).double().user.weight)


def test_bench_ctr_ops_runs_every_row():
    """scripts/bench_ctr_ops.py (a benchmark, not a timed test) runs at a tiny batch and prints
    one row per operation; nothing here checks a speed."""
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_ctr_ops.py"), "--batch", "16",
                          "--threads", "1", "--calls", "1", "--rounds", "1"],
                         capture_output=True, text=True, check=True).stdout
    rows = [line for line in out.splitlines() if line.startswith("| ") and "]" in line]
    assert len(rows) == 10 and any("attention_head (numba)" in r for r in rows), out
