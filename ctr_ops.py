"""Hot operations of the ID-CTR models, written for a fast CPU training step (issue 11).

Each is the same function as the torch layers it replaces, with a hand-written backward. Why: a
DIN step on CPU is bound by passes over memory, not by its matrix products. Torch runs each
elementwise op as its own pass over a [B, K, H] tensor (B samples x K history slots x H hidden
units of the activation unit: 1.5M floats at batch 4,096), and PReLU, dropout and a Linear to one
output take ~20 such passes between them in the forward and backward; its kernels that read or
write bool tensors and its dropout masks are also slow per element: on 1.5M floats a multiply
took 0.21 ms, `torch.where(a > 0, a, b)` 3.5 ms and `bernoulli_` 7.0 ms on the 2-core EPYC we
measured (scripts/bench_ctr_ops.py; README, "Datasets at full size"). So the two kernels below
are loops compiled by numba that read and write each tensor once, and the matrix products around
them stay with torch (MKL).

  relu_dropout(x, p, training)              = Dropout(p)(ReLU()(x))
  attention_head(P, Q, a, w, b)             = Linear(H, 1)(PReLU(a)(P + Q[:, None])).squeeze(-1)
                                              (the last layers of DIN's activation unit)

Each has a pure-torch twin (`relu_dropout_torch`, `prelu_linear`): the reference that
tests/test_ctr_ops.py holds it to in float64 (values and every gradient), and the path taken for
dtypes the kernels do not compile (bf16 under autocast). Both kernels give the same result for any
thread count: every output element is computed by one loop iteration, and the backward's
reductions are summed in PARTS fixed chunks.
"""
from __future__ import annotations

import numba
import numpy as np
import torch

FASTMATH = {"reassoc", "contract"}  # let LLVM vectorise the sums (reordered adds); NaN/inf kept
PARTS = 16  # fixed chunks of the backward's partial sums: the same result whatever the threads
KERNEL_DTYPES = (torch.float32, torch.float64)


# ---- ReLU followed by inverted dropout --------------------------------------------------
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
def _relu_dropout_kernel(x, seed, p, scale, zero, y, mask):
    n, h = x.shape
    for i in numba.prange(n):
        for j in range(h):
            keep = scale if _uniform(seed, i * h + j) >= p else zero
            m = keep if x[i, j] > zero else zero  # relu'(x) * keep / (1 - p); relu'(0) = 0
            mask[i, j] = m
            y[i, j] = x[i, j] * m


class _ReLUDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p: float):
        x2 = x.detach().contiguous().reshape(-1, x.shape[-1])
        y, mask = torch.empty_like(x2), torch.empty_like(x2)
        seed = int(torch.randint(0, 2 ** 62, ())) if p > 0 else 0  # torch.manual_seed rules it
        t = x2.numpy().dtype.type
        _relu_dropout_kernel(x2.numpy(), np.uint64(seed), np.float32(p), t(1.0 / (1.0 - p)), t(0),
                             y.numpy(), mask.numpy())
        ctx.save_for_backward(mask)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, g):
        (mask,) = ctx.saved_tensors
        return (g.reshape(mask.shape) * mask).view(g.shape), None


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
    return _ReLUDropout.apply(x, p)


# ---- DIN's activation unit: PReLU followed by a linear layer to one output ---------------
@numba.njit(parallel=True, cache=True, fastmath=FASTMATH)
def _head_forward(P, Q, a, w, b, zero, out):
    B, K, H = P.shape
    for s in numba.prange(B):
        for k in range(K):
            acc = b
            for j in range(H):
                pre = P[s, k, j] + Q[s, j]
                acc += w[j] * (max(pre, zero) + a * min(pre, zero))
            out[s, k] = acc


@numba.njit(parallel=True, cache=True, fastmath=FASTMATH)
def _head_backward(P, Q, a, w, g, zero, one, gP, gQ, part_w, part_a):
    B, K, H = P.shape
    T = part_a.shape[0]
    for t in numba.prange(T):  # chunk t of the samples; its partial sums in part_*[t]
        pa = zero
        for s in range(t * B // T, (t + 1) * B // T):
            for j in range(H):
                gQ[s, j] = zero
            for k in range(K):
                gk = g[s, k]
                for j in range(H):
                    pre = P[s, k, j] + Q[s, j]
                    neg = min(pre, zero)
                    part_w[t, j] += gk * (max(pre, zero) + a * neg)  # d out / d w = prelu(pre)
                    pa += gk * w[j] * neg  # d out / d a = w . min(pre, 0)
                    d = gk * w[j] * (one if pre > zero else a)  # d out / d pre
                    gP[s, k, j] = d
                    gQ[s, j] += d
        part_a[t] = pa


class _AttentionHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, P, Q, a, w, b):
        P, Q = P.detach().contiguous(), Q.detach().contiguous()
        t = P.numpy().dtype.type
        out = torch.empty(P.shape[:2], dtype=P.dtype)
        _head_forward(P.numpy(), Q.numpy(), t(float(a)), w.detach().reshape(-1).to(P.dtype).numpy(),
                      t(float(b)), t(0), out.numpy())
        ctx.save_for_backward(P, Q, a, w)
        return out

    @staticmethod
    def backward(ctx, g):
        P, Q, a, w = ctx.saved_tensors
        t = P.numpy().dtype.type
        gP, gQ = torch.empty_like(P), torch.empty_like(Q)
        part_w, part_a = np.zeros((PARTS, P.shape[2]), t), np.zeros(PARTS, t)
        g = g.detach().to(P.dtype).contiguous()
        _head_backward(P.numpy(), Q.numpy(), t(float(a)), w.detach().reshape(-1).to(P.dtype).numpy(),
                       g.numpy(), t(0), t(1), gP.numpy(), gQ.numpy(), part_w, part_a)
        return (gP, gQ, torch.from_numpy(part_a.sum(keepdims=True)).to(a.dtype).view_as(a),
                torch.from_numpy(part_w.sum(0)).to(w.dtype).view_as(w), g.sum().to(w.dtype).view(1))


class _PReLULinear(torch.autograd.Function):  # the twin's backward without bool ops or k=1 mm
    @staticmethod
    def forward(ctx, pre, a, w, b):
        wp, bp = w.to(pre.dtype), b.to(pre.dtype)  # (under bf16 autocast pre is bf16)
        neg = pre.clamp(max=0)
        h = torch.add(pre, neg, alpha=float(a) - 1.0)  # = relu(pre) + a * min(pre, 0)
        out = torch.addmv(bp, h.reshape(-1, h.shape[-1]), wp.reshape(-1))
        ctx.save_for_backward(neg, h, a, wp)
        ctx.w_dtype = w.dtype
        return out.view(pre.shape[:-1])

    @staticmethod
    def backward(ctx, g):
        neg, h, a, w = ctx.saved_tensors
        H, dt = h.shape[-1], ctx.w_dtype
        g2, w1 = g.reshape(-1).to(h.dtype), w.reshape(-1)
        gw = torch.mv(h.reshape(-1, H).T, g2).view_as(w).to(dt)
        gb = g2.sum().view(1).to(dt)
        ga = torch.dot(torch.mv(neg.reshape(-1, H), w1), g2).view_as(a).to(a.dtype)
        # d out / d pre = w * (1 where pre > 0, a where pre < 0): sign(neg) is -1 or 0
        slope = torch.sign(neg).mul_(1.0 - float(a)).add_(1.0)
        gpre = slope.mul_(g2.view(*neg.shape[:-1], 1)).mul_(w1)
        return gpre, ga, gw, gb


def prelu_linear(pre: torch.Tensor, a: torch.Tensor, w: torch.Tensor, b: torch.Tensor):
    """The twin in torch ops: Linear(H, 1)(PReLU(a)(pre)).squeeze(-1) for pre [..., H], a
    one-slope PReLU weight [1], w [1, H], b [1]."""
    return _PReLULinear.apply(pre, a, w, b)


def attention_head(P: torch.Tensor, Q: torch.Tensor, a, w, b) -> torch.Tensor:
    """prelu_linear(P + Q.unsqueeze(1), a, w, b) for P [B, K, H] (the per-slot part of the unit's
    first layer), Q [B, H] (the per-sample part, bias included): one pass over P forward, one
    over P and its gradient backward."""
    if P.dtype not in KERNEL_DTYPES or P.dtype != Q.dtype:
        return prelu_linear(P + Q.unsqueeze(1), a, w, b)
    return _AttentionHead.apply(P, Q, a, w, b)
