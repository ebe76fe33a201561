"""Hot operations of the ID-CTR models, written for a fast CPU training step (issue 11), and the
LLM scorer's LoRA dropout.

Each is the same function as the torch layers it replaces, with a hand-written backward. Why: a
DIN step on CPU spends as much time in passes over memory as in its matrix products. Torch runs
each element-wise op as its own pass over a [B, K, H] tensor (B samples x K history slots x H
hidden units of the activation unit: 1.5M floats at batch 4,096), and the unit's PReLU, its
Linear to one output, the pad mask, the pooling and their backward take ~20 such passes; its
kernels that read or write bool tensors and its dropout masks are also slow per element: on 1.5M
floats a multiply took 0.13-0.25 ms, `torch.where(a > 0, a, b)` 3.0-3.3 ms and `bernoulli_`
8.6-9.9 ms on the 2-core EPYC we measured (scripts/bench_ctr_ops.py, several runs; README,
"Datasets at full size"). So the
kernels below are loops compiled by numba that read and write each tensor once, and the matrix
products stay with torch (MKL: ~30-50 GMAC/s at these shapes, where numba loops reached ~8).

  relu_dropout(x, p, training)    = Dropout(p)(ReLU()(x))                        (MLP towers)
  Dropout(p)                      = torch.nn.Dropout(p)        (the LLM scorer's LoRA dropout)
  din_attention(ke, hpos, hsign, q, Q, W, a, w, b)                            (DIN, below)
                                  = the activation unit Linear(H, 1)(PReLU(W.[k, q*k, sign] + Q))
                                    on every history slot, pads masked, and the pooled history
  bag_mean(table, idx)            = the mean of the rows idx names, 0 = padding  (genre means)

Each has a pure-torch twin (`relu_dropout_torch`, `din_attention_torch`, `bag_mean_torch`), the
path taken for dtypes the kernels do not compile (bf16 under autocast); tests/test_ctr_ops.py
holds kernel and twin to torch's layers in float64 (values and every gradient). The kernels give
the same result for any thread count: every output element is computed by one loop iteration,
and the backward's reductions are summed in PARTS fixed chunks or in order (din_attention's
matrix products are torch's: its W gradient differed in the last bits between 1 and 2 threads).
"""
from __future__ import annotations

import os
import sys

# Under torchrun each process gets its share of the cores (parallel.World.threads). numba starts
# its thread pool once, NUMBA_NUM_THREADS workers (default: every usable core), so that number is
# set before numba is imported: with a 2-worker pool in each of 2 processes on the 2-core EPYC of
# the README's benchmarks, train_ctr DIN ran at 31k samples/s, with 1 worker each at 173k.
if os.environ.get("LOCAL_WORLD_SIZE") and "NUMBA_NUM_THREADS" not in os.environ \
        and "numba" not in sys.modules:  # (once numba is imported, changing it would break numba)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ["NUMBA_NUM_THREADS"] = str(max(1, cores // int(os.environ["LOCAL_WORLD_SIZE"])))

import numba  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.autograd.function import once_differentiable  # noqa: E402

FASTMATH = {"reassoc", "contract"}  # let LLVM vectorise the sums (reordered adds); NaN/inf kept
PARTS = 16  # fixed chunks of the backward's partial sums: the same result whatever the threads
KERNEL_DTYPES = (torch.float32, torch.float64)




def lookup(table, idx, padding_idx=None):  # table[idx] by index_select; no gradient to padding_idx
    out = table.index_select(0, idx.reshape(-1)).view(*idx.shape, table.shape[1])
    return out if padding_idx is None else out * (idx != padding_idx).unsqueeze(-1)


def _threads():  # the kernels use torch's thread count (train_ctr --threads, shared by the ranks)
    n = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)


# ---- inverted dropout, with or without a ReLU before it ----------------------------------
@numba.njit(inline="always")
def _uniform(seed, n):
    """A uniform float in [0, 1) with 24 random bits: splitmix64 of (seed, n), so element n of a
    call gets the same number whichever thread computes it."""
    z = seed + np.uint64(n + 1) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return np.float32(z >> np.uint64(40)) * np.float32(1.0 / 16777216.0)


@numba.njit(parallel=True, cache=True, fastmath=FASTMATH)
def _dropout_kernel(x, seed, p, scale, zero, relu, y, mask):
    n, h = x.shape
    for i in numba.prange(n):
        for j in range(h):
            m = scale if _uniform(seed, i * h + j) >= p else zero
            if relu and not x[i, j] > zero:
                m = zero  # relu'(x) * keep / (1 - p); relu'(0) = 0
            mask[i, j] = m
            y[i, j] = x[i, j] * m


class _Dropout(torch.autograd.Function):
    """y = x * mask (relu: mask 0 where x <= 0), mask = 1 / (1 - p) with probability 1 - p."""

    @staticmethod
    def forward(ctx, x, p: float, relu: bool):
        x2 = x.detach().contiguous().reshape(-1, x.shape[-1])
        y, mask = torch.empty_like(x2), torch.empty_like(x2)
        _threads()
        seed = int(torch.randint(0, 2 ** 62, ())) if p > 0 else 0  # torch.manual_seed rules it
        t = x2.numpy().dtype.type
        _dropout_kernel(x2.numpy(), np.uint64(seed), np.float32(p), t(1.0 / (1.0 - p)), t(0), relu,
                        y.numpy(), mask.numpy())
        ctx.save_for_backward(mask)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, g):
        (mask,) = ctx.saved_tensors
        return (g.reshape(mask.shape) * mask).view(g.shape), None, None


def relu_dropout_torch(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """The twin in torch layers (the reference; bf16 under autocast)."""
    return torch.nn.functional.dropout(torch.relu(x), p, training)


def relu_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Dropout(p)(ReLU()(x)): each unit kept with probability 1 - p and scaled by 1 / (1 - p),
    the mask drawn from a seed that torch's generator draws (so torch.manual_seed fixes it)."""
    p = float(p) if training else 0.0
    if x.dtype not in KERNEL_DTYPES:
        return relu_dropout_torch(x, p, training)
    if p == 0 and not x.requires_grad:
        return x.clamp(min=0)
    return _Dropout.apply(x, p, True)


class Dropout(torch.nn.Dropout):
    """torch.nn.Dropout(p) with the mask drawn like relu_dropout's (a seed from torch's generator,
    then splitmix64 per element) for float32/float64 CPU tensors; torch's dropout otherwise. The
    same distribution as torch's, other draws. Why: torch's CPU bernoulli_ took 0.7-0.8 s of a
    3.9-4.4 s scorer SFT step (the 56 LoRA dropouts of the planted preset's scorer; README,
    "Making an iteration affordable")."""

    def forward(self, x):
        if not self.training or not 0 < self.p < 1 or x.dtype not in KERNEL_DTYPES or x.device.type != "cpu":
            return super().forward(x)
        return _Dropout.apply(x, float(self.p), False)


# ---- DIN's activation unit and the attention pooling, fused -----------------------------
# For sample s and history slot k (item row r = hpos[s, k] of ke, one-hot sign h = hsign[s, k],
# m = h[0] + h[1]: 0 on pads), the slot part of the unit's first layer W = [Wk Wp Ws] (columns
# d, d, 2) acting on [k, q*k, h]:
#   pre   = Wk.ke[r] + Wp.(q[s] * ke[r]) + Ws.h + Q[s]
#   att   = w . PReLU_a(pre) + b                          (the kernels' `att` holds m att)
#   pooled[s] = sum_k m att ke[r],   psign[s] = sum_k m att h
# Wk.ke[r] depends on the item only, so it is computed once per distinct item of the batch
# (Pk = ke Wk^T, U rows, not B K); Wp.(q * k) is one matrix product over the B K slots; Ws.h is
# two columns, added in the head. The products (forward, and their gradients in the backward) are
# torch's (MKL: ~30-50 GMAC/s at these shapes, where a numba loop reached ~8); the kernels below
# do everything around them in one pass each: building q * k, the head, mask and pooling, and
# adding each slot's gradient into its item's row.
@numba.njit(parallel=True, cache=True, fastmath=FASTMATH)
def _din_rows(ke, hpos, q, X):  # X[s K + k] = q[s] * ke[r]
    B, K = hpos.shape
    for s in numba.prange(B):
        for k in range(K):
            n, r = s * K + k, hpos[s, k]
            for i in range(q.shape[1]):
                X[n, i] = q[s, i] * ke[r, i]


@numba.njit(inline="always")
def _din_pre(P, Pk, Q, Ws, n, r, s, j, h0, h1):  # the first layer's output, unit j of slot n
    return P[n, j] + Pk[r, j] + Q[s, j] + h0 * Ws[0, j] + h1 * Ws[1, j]


@numba.njit(parallel=True, cache=True, fastmath=FASTMATH)
def _din_head_forward(P, Pk, Q, Ws, ke, hpos, hsign, a, w, b, zero, pooled, psign, att):
    B, K = hpos.shape
    H, d = Q.shape[1], ke.shape[1]
    for s in numba.prange(B):
        for i in range(d):
            pooled[s, i] = zero
        psign[s, 0], psign[s, 1] = zero, zero
        for k in range(K):
            n, r = s * K + k, hpos[s, k]
            h0, h1 = hsign[s, k, 0], hsign[s, k, 1]
            acc = b
            for j in range(H):
                pre = _din_pre(P, Pk, Q, Ws, n, r, s, j, h0, h1)
                acc += w[j] * (max(pre, zero) + a * min(pre, zero))
            wk = acc * (h0 + h1)  # 0 on pads: nothing pooled
            att[s, k] = wk
            for i in range(d):
                pooled[s, i] += wk * ke[r, i]
            psign[s, 0] += wk * h0
            psign[s, 1] += wk * h1


@numba.njit(parallel=True, cache=True, fastmath=FASTMATH)
def _din_head_backward(P, Pk, Q, Ws, ke, hpos, hsign, a, w, zero, one, gpool, gps, gpre, gQ, p_w,
                       p_ws, p_ab):
    B, K = hpos.shape
    H, d = Q.shape[1], ke.shape[1]
    T = p_ab.shape[0]
    for t in numba.prange(T):  # chunk t of the samples; its partial sums in p_*[t]
        pa, pb = zero, zero
        for s in range(t * B // T, (t + 1) * B // T):
            for j in range(H):
                gQ[s, j] = zero
            for k in range(K):
                n, r = s * K + k, hpos[s, k]
                h0, h1 = hsign[s, k, 0], hsign[s, k, 1]
                g = gps[s, 0] * h0 + gps[s, 1] * h1  # d loss / d (m att)
                for i in range(d):
                    g += gpool[s, i] * ke[r, i]
                g *= h0 + h1  # d loss / d att
                pb += g
                for j in range(H):
                    pre = _din_pre(P, Pk, Q, Ws, n, r, s, j, h0, h1)
                    neg = min(pre, zero)
                    p_w[t, j] += g * (max(pre, zero) + a * neg)  # d att / d w = prelu(pre)
                    pa += g * w[j] * neg  # d att / d a = w . min(pre, 0)
                    gp = g * w[j] * (one if pre > zero else a)  # d att / d pre
                    gpre[n, j] = gp
                    gQ[s, j] += gp
                    p_ws[t, 0, j] += gp * h0  # d pre / d Ws = h
                    p_ws[t, 1, j] += gp * h1
        p_ab[t, 0], p_ab[t, 1] = pa, pb


@numba.njit(cache=True)
def _din_slots_by_item(hpos, hsign, start, order):
    """The attended slots (not pads) grouped by item row, in slot order (a counting sort): the
    slots of row u are order[start[u]:start[u + 1]]."""
    B, K = hpos.shape
    for s in range(B):
        for k in range(K):
            if hsign[s, k, 0] + hsign[s, k, 1] != 0:
                start[hpos[s, k] + 1] += 1
    for u in range(start.shape[0] - 1):
        start[u + 1] += start[u]
    fill = start[:-1].copy()
    for s in range(B):
        for k in range(K):
            if hsign[s, k, 0] + hsign[s, k, 1] != 0:
                r = hpos[s, k]
                order[fill[r]] = s * K + k
                fill[r] += 1


@numba.njit(parallel=True, cache=True, fastmath=FASTMATH)
def _din_item_grads(start, order, K, gpre, gX, q, att, gpool, zero, gPk, gke):
    """Per distinct item u, its slots' gradients summed in slot order (the same sums for any
    thread count): gPk[u] = sum gpre (d loss / d Pk), gke[u] = sum q * gX + m att gpool (through
    q * k and the pooling; Wk's share is added after, as gPk Wk)."""
    U, H = gPk.shape
    d = gke.shape[1]
    for u in numba.prange(U):
        for j in range(H):
            gPk[u, j] = zero
        for i in range(d):
            gke[u, i] = zero
        for t in range(start[u], start[u + 1]):
            n = order[t]
            s = n // K
            for j in range(H):
                gPk[u, j] += gpre[n, j]
            for i in range(d):
                gke[u, i] += q[s, i] * gX[n, i] + att[s, n - s * K] * gpool[s, i]


@numba.njit(parallel=True, cache=True, fastmath=FASTMATH)
def _din_query_grads(gX, ke, hpos, zero, gq):  # d / d q of sum_k Wp.(q * k): sum_k gX * k
    B, K = hpos.shape
    for s in numba.prange(B):
        for i in range(gq.shape[1]):
            gq[s, i] = zero
        for k in range(K):
            n, r = s * K + k, hpos[s, k]
            for i in range(gq.shape[1]):
                gq[s, i] += gX[n, i] * ke[r, i]


class _DINAttention(torch.autograd.Function):  # (no double backward: numba computes the grads)
    @staticmethod
    def forward(ctx, ke, hpos, hsign, q, Q, W, a, w, b):
        ke, hpos, hsign, q, Q = (x.detach().contiguous() for x in (ke, hpos, hsign, q, Q))
        t, (B, K), d = ke.numpy().dtype.type, hpos.shape, ke.shape[1]
        _threads()
        Wd = W.detach().to(ke.dtype)
        Wk, Wp, Ws = Wd[:, :d], Wd[:, d:2 * d].contiguous(), Wd[:, 2 * d:].T.contiguous()
        Pk = ke @ Wk.T  # [U, H]: the item part, once per distinct item
        X = torch.empty(B * K, d, dtype=ke.dtype)
        _din_rows(ke.numpy(), hpos.numpy(), q.numpy(), X.numpy())
        P = X @ Wp.T  # [B K, H]: the q * k part, per slot
        wv = w.detach().reshape(-1).to(ke.dtype).contiguous()
        pooled, psign = torch.empty(B, d, dtype=ke.dtype), torch.empty(B, 2, dtype=ke.dtype)
        att = torch.empty(B, K, dtype=ke.dtype)
        _din_head_forward(P.numpy(), Pk.numpy(), Q.numpy(), Ws.numpy(), ke.numpy(), hpos.numpy(),
                          hsign.numpy(), t(float(a)), wv.numpy(), t(float(b)), t(0), pooled.numpy(),
                          psign.numpy(), att.numpy())
        ctx.save_for_backward(ke, hpos, hsign, q, Q, X, P, Pk, Wd, a, wv, att)
        ctx.info = (W.dtype, w.dtype, w.shape, b.dtype)
        return pooled, psign

    @staticmethod
    @once_differentiable
    def backward(ctx, gpool, gps):
        ke, hpos, hsign, q, Q, X, P, Pk, Wd, a, wv, att = ctx.saved_tensors
        W_dt, w_dt, w_shape, b_dt = ctx.info
        t, (B, K), (U, d), H = q.numpy().dtype.type, hpos.shape, ke.shape, Q.shape[1]
        Wk, Wp, Ws = Wd[:, :d], Wd[:, d:2 * d].contiguous(), Wd[:, 2 * d:].T.contiguous()
        _threads()
        gpool, gps = gpool.to(q.dtype).contiguous(), gps.to(q.dtype).contiguous()
        gpre, gQ = torch.empty_like(P), torch.empty_like(Q)
        p_w, p_ws, p_ab = np.zeros((PARTS, H), t), np.zeros((PARTS, 2, H), t), np.zeros((PARTS, 2), t)
        _din_head_backward(P.numpy(), Pk.numpy(), Q.numpy(), Ws.numpy(), ke.numpy(), hpos.numpy(),
                           hsign.numpy(), t(float(a)), wv.numpy(), t(0), t(1), gpool.numpy(),
                           gps.numpy(), gpre.numpy(), gQ.numpy(), p_w, p_ws, p_ab)
        gX = gpre @ Wp  # [B K, d]: d loss / d (q * k)
        start, order = np.zeros(U + 1, np.int64), np.empty(B * K, np.int64)
        _din_slots_by_item(hpos.numpy(), hsign.numpy(), start, order)
        gPk, gke, gq = torch.empty(U, H, dtype=q.dtype), torch.empty_like(ke), torch.empty_like(q)
        _din_item_grads(start, order, K, gpre.numpy(), gX.numpy(), q.numpy(), att.numpy(),
                        gpool.numpy(), t(0), gPk.numpy(), gke.numpy())
        _din_query_grads(gX.numpy(), ke.numpy(), hpos.numpy(), t(0), gq.numpy())
        gke.addmm_(gPk, Wk)  # the item part's share: d Pk / d ke
        gW = torch.cat([gPk.T @ ke, gpre.T @ X, torch.from_numpy(p_ws.sum(0).T)], 1)
        ab = p_ab.sum(0)
        return (gke, None, None, gq, gQ, gW.to(W_dt), torch.tensor([ab[0]], dtype=a.dtype),
                torch.from_numpy(p_w.sum(0)).to(w_dt).view(w_shape), torch.tensor([ab[1]], dtype=b_dt))


def din_attention_torch(ke, hpos, hsign, q, Q, W, a, w, b):
    """The twin in torch layers (the reference; bf16 under autocast)."""
    hk = lookup(ke, hpos)
    X = torch.cat([hk, q.unsqueeze(1) * hk, hsign], -1)
    pre = F.linear(X, W) + Q.unsqueeze(1)
    att = (F.linear(F.prelu(pre, a), w, b).squeeze(-1) * hsign.sum(-1)).unsqueeze(-1)
    return (att * hk).sum(1), (att * hsign).sum(1)


def din_attention(ke, hpos, hsign, q, Q, W, a, w, b):
    """DIN's activation unit and attention pooling over the history (see above): ke [U, d] the
    keys of the batch's distinct items, hpos [B, K] each slot's row of ke, hsign [B, K, 2] its
    one-hot sign (0 0 on pads), q [B, d] the target's key, Q [B, H] the per-sample part of the
    first layer (bias included), W [H, 2d + 2] its per-slot part, a [1] the (one) PReLU slope,
    w [1, H] and b [1] the last layer. -> (pooled [B, d], psign [B, 2]). hpos and hsign get no
    gradient from the kernels (they are data)."""
    if (ke.dtype not in KERNEL_DTYPES or len({x.dtype for x in (ke, hsign, q, Q)}) > 1
            or not hpos.numel()):  # (an empty batch: the twin's empty result)
        return din_attention_torch(ke, hpos, hsign, q, Q, W, a, w, b)
    return _DINAttention.apply(ke, hpos, hsign, q, Q, W, a, w, b)


# ---- mean of embedding rows (an item's genres) ------------------------------------------
@numba.njit(parallel=True, cache=True, fastmath=FASTMATH)
def _bag_mean_forward(table, idx, zero, out):  # out[u] = mean of table[idx[u, g]] over idx > 0
    U, G = idx.shape
    d = table.shape[1]
    for u in numba.prange(U):
        for i in range(d):
            out[u, i] = zero
        n = 0
        for g in range(G):
            r = idx[u, g]
            if r > 0:
                n += 1
                for i in range(d):
                    out[u, i] += table[r, i]
        if n > 1:
            for i in range(d):
                out[u, i] /= n


@numba.njit(cache=True, fastmath=FASTMATH)
def _bag_mean_backward(idx, gout, gtable):  # serial, in order: the same sums always
    U, G = idx.shape
    d = gout.shape[1]
    for u in range(U):
        n = 0
        for g in range(G):
            n += idx[u, g] > 0
        for g in range(G):
            r = idx[u, g]
            if r > 0:
                for i in range(d):
                    gtable[r, i] += gout[u, i] / n


class _BagMean(torch.autograd.Function):
    @staticmethod
    def forward(ctx, table, idx):
        table, idx = table.detach().contiguous(), idx.contiguous()
        _threads()
        out = torch.empty(idx.shape[0], table.shape[1], dtype=table.dtype)
        _bag_mean_forward(table.numpy(), idx.numpy(), table.numpy().dtype.type(0), out.numpy())
        ctx.save_for_backward(idx)
        ctx.shape = table.shape
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, gout):
        (idx,) = ctx.saved_tensors
        gtable = torch.zeros(ctx.shape, dtype=gout.dtype)
        _bag_mean_backward(idx.numpy(), gout.contiguous().numpy(), gtable.numpy())
        return gtable, None


def bag_mean_torch(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The twin in torch ops (the reference; bf16 under autocast)."""
    m = (idx > 0).to(table.dtype).unsqueeze(-1)
    return (lookup(table, idx) * m).sum(-2) / m.sum(-2).clamp(min=1)


def bag_mean(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Row u: the mean of table[idx[u, g]] over the g with idx[u, g] > 0 (0 = padding, which gets
    no gradient), 0 where there is none. idx [U, G] int64 -> [U, d]. One pass over the rows; the
    backward adds each row's share into the table in order (no scatter_add of U x G rows)."""
    if table.dtype not in KERNEL_DTYPES:
        return bag_mean_torch(table, idx)
    return _BagMean.apply(table, idx)
