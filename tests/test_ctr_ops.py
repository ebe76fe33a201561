"""ctr_ops.py and the fast CTR training step against their torch references (float64): the numba
kernels (ReLU + dropout; DIN's activation unit + pooling; the genre mean) and their torch twins
(values and every gradient), the same results for any thread count, the batch's float sign
one-hot and distinct-item ids, and the embedding L2 as Adam's weight decay."""
from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
from pathlib import Path

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


@contextlib.contextmanager
def threads(n):
    """torch's thread count for a block (the kernels follow it: ctr_ops._threads)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def din_inputs(dtype, B=37, K=6, d=5, H=9, U=20, seed=0):
    """Random inputs of ctr_ops.din_attention, pads (0 0 signs) and both signs present; B = 37
    makes uneven PARTS chunks."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype).requires_grad_()
    lab = torch.randint(0, 3, (B, K), generator=g)
    lab[0] = 0  # a sample with no history at all
    hsign = torch.stack([lab == 1, lab == 2], -1).to(dtype)
    return [r(U, d), torch.randint(0, U, (B, K), generator=g), hsign, r(B, d), r(B, H),
            r(H, 2 * d + 2), torch.tensor([0.2], dtype=dtype, requires_grad=True), r(1, H), r(1)]


def din_reference(ke, hpos, hsign, q, Q, W, a, w, b):
    """DIN's activation unit and pooling written with torch's layers on the concatenated input
    [k, q*k, sign] (+ the per-sample part Q): PReLU, Linear(H, 1), pads masked, weighted sums."""
    hk = ke[hpos]
    x = torch.cat([hk, q.unsqueeze(1).expand_as(hk) * hk, hsign], -1)
    act, last = torch.nn.PReLU().to(ke.dtype), torch.nn.Linear(W.shape[0], 1).to(ke.dtype)
    att = torch.func.functional_call(act, {"weight": a}, (x @ W.T + Q.unsqueeze(1),))
    att = torch.func.functional_call(last, {"weight": w, "bias": b}, (att,)).squeeze(-1)
    att = att * (hsign.sum(-1) > 0)
    return (att.unsqueeze(-1) * hk).sum(1), (att.unsqueeze(-1) * hsign).sum(1)


@pytest.mark.parametrize("fn", ["din_attention", "din_attention_torch"])
def test_din_attention_equals_the_unit_on_the_concatenated_input_values_and_gradients(fn):
    """The numba kernels (and their torch twin) are DIN's unit + pooling written with torch's
    layers: float64 to 1e-12, float32 to float32 rounding, every gradient; pads get none."""
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-5)):
        args = din_inputs(dtype)
        diff = [x for x in args if x.requires_grad]
        ours, ref = getattr(ctr_ops, fn)(*args), din_reference(*args)
        for x, y in zip(ours, ref):
            torch.testing.assert_close(x, y, rtol=tol, atol=tol)
        gs = [torch.randn_like(x) for x in ref]
        got = torch.autograd.grad(ours, diff, gs)
        for x, y in zip(got, torch.autograd.grad(ref, diff, gs)):
            torch.testing.assert_close(x, y, rtol=10 * tol, atol=10 * tol)
        assert torch.equal(ours[0][0], torch.zeros_like(ours[0][0]))  # no history: nothing pooled
    small = din_inputs(torch.float64, B=5, K=3, d=2, H=3, U=4)
    assert torch.autograd.gradcheck(lambda *x: getattr(ctr_ops, fn)(*x), small)


def test_din_attention_kernel_is_the_same_for_any_thread_count():
    """Bit for bit with 1 and 2 threads: every output is one loop iteration's, the weight
    gradients are summed in PARTS fixed chunks, the key gradients scattered in order. The one
    exception is W's gradient, a torch matrix product (MKL sums in another order for another
    thread count): equal to float rounding."""
    args = din_inputs(torch.float32, B=301)
    diff = [x for x in args if x.requires_grad]
    runs = []
    for n in (1, 2):
        with threads(n):
            out = ctr_ops.din_attention(*args)
            runs.append([*out, *torch.autograd.grad(out, diff, [torch.ones_like(x) for x in out])])
    names = ["pooled", "psign", "ke", "q", "Q", "W", "a", "w", "b"]
    for name, x, y in zip(names, *runs):
        if name == "W":
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5 * y.abs().max().item())
        else:
            assert torch.equal(x, y), name


def test_bag_mean_kernel_equals_the_masked_mean_values_and_gradients():
    """bag_mean (numba) and its torch twin: the mean of the rows named in each row of idx,
    0 = padding (no gradient to the padding row), 0 for an empty row; any thread count."""
    g = torch.Generator().manual_seed(0)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        table = torch.randn(9, 4, generator=g, dtype=dtype, requires_grad=True)
        idx = torch.randint(0, 9, (53, 5), generator=g)
        idx[0], idx[1, 1:] = 0, 0  # an empty row, a one-genre row
        want = torch.stack([table[[j for j in row.tolist() if j > 0]].mean(0) if (row > 0).any()
                            else torch.zeros(4, dtype=dtype) for row in idx])
        gout = torch.randn(53, 4, generator=g, dtype=dtype)
        gwant = torch.autograd.grad(want, table, gout)[0]
        assert torch.equal(gwant[0], torch.zeros(4, dtype=dtype))
        for fn in (ctr_ops.bag_mean, ctr_ops.bag_mean_torch):
            out = fn(table, idx)
            torch.testing.assert_close(out, want, rtol=tol, atol=tol)
            torch.testing.assert_close(torch.autograd.grad(out, table, gout)[0], gwant, rtol=tol, atol=tol)
        with threads(1):
            one = ctr_ops.bag_mean(table, idx)
        assert torch.equal(one, ctr_ops.bag_mean(table, idx))


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
    with threads(1):
        torch.manual_seed(1)
        assert torch.equal(ctr_ops.relu_dropout(x, p, True), y)  # whatever the thread count


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


def test_batch_distinct_items_are_np_unique_with_inverse_for_any_thread_count(feats):
    """The batch's distinct items (uitem, and the rows tpos / hpos) are np.unique of the target
    and history item codes with its inverse, for shuffled batches with repeated samples, and every
    column is the same with 1 and 2 threads."""
    f, _ = feats
    rng = np.random.default_rng(0)
    pad = len(f.a.items)  # the code of an empty history slot
    for size in (1, 7, 300):
        idx = rng.integers(0, len(f), size)
        runs = []
        for n in (1, 2):
            with threads(n):
                runs.append(f.batch(idx))
        b = runs[0]
        a = f.a
        hic = np.full((size, f.K), pad)
        for s, j in enumerate(idx):
            h = np.asarray(a.hist_iid[a.lo[j]:a.hi[j]])[-f.K:]
            hic[s, :len(h)] = h
        codes = np.concatenate([np.asarray(a.iid)[idx], hic.ravel()])
        uniq, inv = np.unique(codes, return_inverse=True)
        assert torch.equal(b["uitem"], torch.from_numpy(f.ilut[uniq]))
        assert torch.equal(b["tpos"], torch.from_numpy(inv[:size]))
        assert torch.equal(b["hpos"], torch.from_numpy(inv[size:].reshape(size, f.K)))
        for k in b:
            assert torch.equal(runs[0][k], runs[1][k]), k


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
    assert len(rows) == 11 and any("din_attention (numba + MKL)" in r for r in rows), out


def test_numba_pool_is_a_share_of_the_cores_under_torchrun():
    """Under torchrun (LOCAL_WORLD_SIZE set) importing ctr_ops sizes numba's thread pool to this
    process's share of the cores, unless NUMBA_NUM_THREADS is given; alone, numba's default."""
    import os
    code = "import ctr_ops, numba, os; print(numba.config.NUMBA_NUM_THREADS, len(os.sched_getaffinity(0)))"
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_NUM_THREADS", "LOCAL_WORLD_SIZE")}
    def run(**e):
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, **e},
                             capture_output=True, text=True, check=True).stdout
        return [int(x) for x in out.split()]
    n, cores = run(LOCAL_WORLD_SIZE=str(len(os.sched_getaffinity(0))))
    assert n == 1
    n, cores = run(LOCAL_WORLD_SIZE="1")
    assert n == cores
    assert run(LOCAL_WORLD_SIZE="2", NUMBA_NUM_THREADS="1")[0] == 1
