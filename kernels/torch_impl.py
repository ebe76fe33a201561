"""Pure-torch twin of the fused selected-token log-prob kernels (CPU default, CUDA fallback).

Same contract as kernels.selected_logprobs (see kernels/__init__.py). The [N, V] logits are never
held: the vocabulary is walked in tiles of `vocab_tile` columns and the rows in chunks of
`row_chunk`, so the only V-sized scratch is one (or, with entropy, two) fp32 buffers of
row_chunk x vocab_tile. Per row we keep the online statistics

    m   running max of z = logits / T                       (forward only)
    s   sum_j exp(z_j - m)                                    -> lse = m + log s
    sd  sum_j exp(z_j - m) * (z_j - m)                        -> entropy = log s - sd / s
    zt  z[target]                                             -> logp = zt - lse

and save only lse and S = sum_j p_j z_j = lse - entropy for backward, which recomputes each tile:

    d logp / d z_j    = onehot_j - p_j
    d entropy / d z_j = -p_j (z_j - S)        (H = lse - S; dS/dz_j = p_j (1 + z_j - S))
    dz   = g (onehot - p) - gH p (z - S),   dlogits = dz / T
    grad_hidden = sum_tiles dlogits @ W_tile,  grad_W_tile = dlogits^T @ hidden,  grad_b = sum_rows

Loop order: vocab tiles outside, row chunks inside, so a grad_W tile is finished (and cast to the
weight dtype) before the next tile starts: no full fp32 [V, H] buffer for bf16 weights. 1/T is
folded into the fp32 weight tile (z = h @ (W/T)^T + b/T), so grad_hidden needs no extra pass.

Everything is accumulated in fp32 whatever the input dtype: bf16 tiles are upcast before the
matmul. [ours] On a CPU with native bf16 GEMM this is slower than a bf16 matmul with bf16 output,
but a bf16 logit carries an error of up to |z| * 2^-9 (~0.06 at z = 30), too coarse for PPO ratios.

Exponent arguments are clamped at EXP_FLOOR = -80 (exp(-80) ~ 2e-35, a normal float): tiny terms
would otherwise be computed as subnormals, which makes exp ~10x slower on x86 CPUs; the effect on
lse is below 1e-30 relative. It also keeps -inf logits (masked vocabulary) NaN-free.
"""
from __future__ import annotations

import torch

ROW_CHUNK = 1024          # rows per chunk (CPU-tuned: large chunks keep the GEMM efficient)
VOCAB_TILE = 4096         # vocabulary columns per tile
TILE_ELEMS = 1 << 22      # when N is small, widen the vocab tile up to this many elements (16 MiB)
EXP_FLOOR = -80.0         # clamp for exponent arguments (see module docstring)
DIFF_FLOOR = -1e4         # clamp for z - S in the entropy gradient (keeps -inf logits NaN-free)


def _tiles(n: int, v: int, row_chunk: int | None, vocab_tile: int | None) -> tuple[int, int]:
    r = max(1, min(n, row_chunk or ROW_CHUNK))
    vt = vocab_tile or max(VOCAB_TILE, TILE_ELEMS // r)
    return r, max(1, min(v, vt))


def _weight_tile(weight, bias, v0, v1, inv_t):
    """fp32 W[v0:v1] / T and b[v0:v1] / T (views, no copy, when already fp32 and T == 1)."""
    w = weight[v0:v1]
    w = w.float() if inv_t == 1.0 else w.float() * inv_t
    b = None
    if bias is not None:
        b = bias[v0:v1].float()
        b = b if inv_t == 1.0 else b * inv_t
    return w, b


def _rows32(hidden, r0, r1, hbuf):
    """fp32 hidden[r0:r1] (a view when hidden is fp32, else copied into the reusable hbuf)."""
    h = hidden[r0:r1]
    if h.dtype == torch.float32:
        return h
    out = hbuf[: r1 - r0]
    out.copy_(h)
    return out


def _logits(hc, w, b, buf):
    out = buf[: hc.shape[0], : w.shape[0]]
    if b is None:
        return torch.mm(hc, w.t(), out=out)
    return torch.addmm(b, hc, w.t(), out=out)


def _in_tile(tc, valid, vt):
    """Row indices (within the chunk) whose target falls in the current tile."""
    return ((tc >= 0) & (tc < vt) & valid).nonzero().squeeze(1)


# ---- algorithm: forward statistics (online log-sum-exp + entropy over vocab tiles) ----
def forward_stats(hidden, weight, bias, targets, valid, inv_t, entropy,
                  row_chunk=None, vocab_tile=None):
    """Returns (logp [N], lse [N], ent [N] or None) in fp32; ignored rows give logp = ent = 0."""
    n, hdim = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    f32 = dict(device=dev, dtype=torch.float32)
    m = torch.full((n,), -1e30, **f32)      # finite start: (m_old - m_new) * s stays 0, not NaN
    s = torch.zeros(n, **f32)
    sd = torch.zeros(n, **f32) if entropy else None
    zt = torch.zeros(n, **f32)
    if n == 0:
        return zt, zt.clone(), (zt.clone() if entropy else None)
    r, vt = _tiles(n, v, row_chunk, vocab_tile)
    buf = torch.empty(r, vt, **f32)
    buf2 = torch.empty(r, vt, **f32) if entropy else None
    hbuf = torch.empty(r, hdim, **f32) if hidden.dtype != torch.float32 else None
    for v0 in range(0, v, vt):
        v1 = min(v, v0 + vt)
        w, b = _weight_tile(weight, bias, v0, v1, inv_t)
        for r0 in range(0, n, r):
            r1 = min(n, r0 + r)
            z = _logits(_rows32(hidden, r0, r1, hbuf), w, b, buf)
            hit = _in_tile(targets[r0:r1] - v0, valid[r0:r1], v1 - v0)
            if hit.numel():                                     # pick the target logit
                zt[r0:r1].index_copy_(0, hit, z[hit, targets[r0:r1][hit] - v0])
            mc, sc = m[r0:r1], s[r0:r1]
            m_new = torch.maximum(mc, z.amax(1))
            alpha = torch.exp(mc - m_new)
            z.sub_(m_new[:, None]).clamp_(min=EXP_FLOOR)        # z <- z - m_new
            if entropy:
                e = torch.exp(z, out=buf2[: r1 - r0, : v1 - v0])
                sdc = sd[r0:r1]
                # rescale sum e*(z - m) to the new max, then add this tile
                sdc.add_((mc - m_new) * sc).mul_(alpha).add_(torch.linalg.vecdot(e, z))
            else:
                e = z.exp_()
            sc.mul_(alpha).add_(e.sum(1))
            mc.copy_(m_new)
    log_s = torch.log(s)
    lse = m + log_s
    logp = torch.where(valid, zt - lse, 0.0)
    ent = torch.where(valid, log_s - sd / s, 0.0) if entropy else None
    return logp, lse, ent


# ---- algorithm: backward (recompute tiles; never holds [N, V]) ----
def backward_grads(hidden, weight, bias, targets, valid, inv_t, lse, big_s, g, g_ent,
                   need_h, need_w, need_b, row_chunk=None, vocab_tile=None):
    """g, g_ent: fp32 [N] upstream grads (g_ent None = no entropy term), already 0 on ignored rows.
    Returns (grad_hidden, grad_weight, grad_bias), None where not needed.

    Without entropy, dz = -g p + g onehot, so the row factor -g is pulled out of the tile:
    grad_h = -g * sum_tiles(P @ W/T) + g W[t]/T and grad_W_tile = P^T @ (-g h) / T + onehot rows;
    the tile then only needs p = exp(z - lse) (3 in-place passes). With entropy the tile holds
    dz = -p (g + gH (z - S)) explicitly. The onehot part is added from W[t] / h rows directly."""
    n, hdim = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    f32 = dict(device=dev, dtype=torch.float32)
    gh = torch.zeros(n, hdim, **f32) if need_h else None
    gw = torch.empty_like(weight) if need_w else None
    gb = torch.empty_like(bias) if need_b else None
    if n == 0:
        if need_w:
            gw.zero_()
        if need_b:
            gb.zero_()
        return gh, gw, gb
    ent = g_ent is not None
    r, vt = _tiles(n, v, row_chunk, vocab_tile)
    buf = torch.empty(r, vt, **f32)
    buf2 = torch.empty(r, vt, **f32) if ent else None
    hbuf = torch.empty(r, hdim, **f32) if hidden.dtype != torch.float32 else None
    hgbuf = torch.empty(r, hdim, **f32) if need_w and not ent else None
    gw_tile = torch.empty(vt, hdim, **f32) if need_w else None
    gb_tile = torch.empty(vt, **f32) if need_b else None
    neg_g = -g
    for v0 in range(0, v, vt):
        v1 = min(v, v0 + vt)
        w, b = _weight_tile(weight, bias, v0, v1, inv_t)
        gwt = gw_tile[: v1 - v0].zero_() if need_w else None
        gbt = gb_tile[: v1 - v0].zero_() if need_b else None
        for r0 in range(0, n, r):
            r1 = min(n, r0 + r)
            hc = _rows32(hidden, r0, r1, hbuf)
            z = _logits(hc, w, b, buf)
            if ent:                                             # x = dz = -p (g + gH (z - S))
                c = torch.sub(z, big_s[r0:r1, None], out=buf2[: r1 - r0, : v1 - v0])
                c.clamp_(min=DIFF_FLOOR).mul_(g_ent[r0:r1, None]).add_(g[r0:r1, None])
                x = z.sub_(lse[r0:r1, None]).clamp_(min=EXP_FLOOR).exp_().mul_(c).neg_()
            else:                                               # x = p; dz = -g p
                x = z.sub_(lse[r0:r1, None]).clamp_(min=EXP_FLOOR).exp_()
            if need_h:
                gh[r0:r1].addmm_(x, w)                          # w = W/T: this is d/dlogits
            if need_w:
                if ent:
                    gwt.addmm_(x.t(), hc)
                else:
                    hg = torch.mul(hc, neg_g[r0:r1, None], out=hgbuf[: r1 - r0])
                    gwt.addmm_(x.t(), hg)
            if need_b:
                if ent:
                    gbt.add_(x.sum(0))
                else:
                    gbt.addmv_(x.t(), neg_g[r0:r1])
            if need_w or need_b:                                # + g onehot
                hit = _in_tile(targets[r0:r1] - v0, valid[r0:r1], v1 - v0)
                if hit.numel():
                    tl_ = targets[r0:r1][hit] - v0
                    gh_hit = g[r0:r1][hit]
                    if need_w:
                        gwt.index_add_(0, tl_, hc[hit] * gh_hit[:, None])
                    if need_b:
                        gbt.index_add_(0, tl_, gh_hit)
        if need_w:
            gw[v0:v1].copy_(gwt.mul_(inv_t) if inv_t != 1.0 else gwt)
        if need_b:
            gb[v0:v1].copy_(gbt.mul_(inv_t) if inv_t != 1.0 else gbt)
    if need_h:
        if not ent:
            gh.mul_(neg_g[:, None])
        rows = valid.nonzero().squeeze(1)                       # + g W[t] / T
        wt = weight.index_select(0, targets[rows]).float()
        gh.index_add_(0, rows, wt * (g[rows] * inv_t)[:, None])
        gh = gh.to(hidden.dtype)
    return gh, gw, gb


# ---- plumbing: autograd wrappers ----
class SelectedLogprobs(torch.autograd.Function):
    """(hidden, weight, bias, targets, ...) -> (logp, ent or empty). Hand-written backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, ignore_index, entropy,
                row_chunk, vocab_tile):
        inv_t = 1.0 / float(temperature)
        valid = targets != ignore_index
        logp, lse, ent = forward_stats(hidden, weight, bias, targets, valid, inv_t, entropy,
                                       row_chunk, vocab_tile)
        big_s = (lse - ent) if entropy else None                # S = sum p z = lse - H
        ctx.save_for_backward(hidden, weight, bias, targets, valid, lse, big_s)
        ctx.cfg = (inv_t, row_chunk, vocab_tile)
        if entropy:
            return logp, ent
        empty = lse.new_empty(0)
        ctx.mark_non_differentiable(empty)
        return logp, empty

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_logp, g_ent):
        hidden, weight, bias, targets, valid, lse, big_s = ctx.saved_tensors
        inv_t, row_chunk, vocab_tile = ctx.cfg
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        zeros = torch.zeros_like(lse)
        g = torch.where(valid, g_logp.float(), 0.0) if g_logp is not None else zeros
        ge = None
        if big_s is not None and g_ent is not None and g_ent.numel():
            ge = torch.where(valid, g_ent.float(), 0.0)
        gh, gw, gb = backward_grads(hidden, weight, bias, targets, valid, inv_t, lse, big_s, g,
                                    ge, need_h, need_w, need_b and bias is not None,
                                    row_chunk, vocab_tile)
        return gh, gw, gb, None, None, None, None, None, None


def selected_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100,
                      return_entropy=False, row_chunk=None, vocab_tile=None):
    """2-D inputs only (the dispatcher in kernels/__init__.py flattens and validates)."""
    logp, ent = SelectedLogprobs.apply(hidden, weight, bias, targets, temperature, ignore_index,
                                          bool(return_entropy), row_chunk, vocab_tile)
    return (logp, ent) if return_entropy else logp


# ---- algorithm: from_logits (row-chunked; the caller already holds [N, V]) ----
def _chunk_rows(n, v, row_chunk):
    return max(1, min(n, row_chunk or max(1, TILE_ELEMS // max(v, 1))))


class LogprobsFromLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, temperature, ignore_index, row_chunk):
        n, v = logits.shape
        inv_t = 1.0 / float(temperature)
        valid = targets != ignore_index
        lse = torch.empty(n, device=logits.device, dtype=torch.float32)
        r = _chunk_rows(n, v, row_chunk)
        buf = torch.empty(r, v, device=logits.device, dtype=torch.float32)
        for r0 in range(0, n, r):
            r1 = min(n, r0 + r)
            z = buf[: r1 - r0]
            z.copy_(logits[r0:r1])                              # never modify the caller's logits
            if inv_t != 1.0:
                z.mul_(inv_t)
            m = z.amax(1)
            z.sub_(m[:, None]).clamp_(min=EXP_FLOOR).exp_()
            lse[r0:r1] = m + torch.log(z.sum(1))
        safe = torch.where(valid, targets, 0)
        zt = logits.gather(1, safe[:, None]).squeeze(1).float() * inv_t
        logp = torch.where(valid, zt - lse, 0.0)
        ctx.save_for_backward(logits, targets, valid, lse)
        ctx.cfg = (inv_t, r)
        return logp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_logp):
        logits, targets, valid, lse = ctx.saved_tensors
        inv_t, r = ctx.cfg
        n, v = logits.shape
        g = torch.where(valid, g_logp.float(), 0.0) * inv_t      # d/dlogits = d/dz / T
        grad = torch.empty_like(logits)
        buf = torch.empty(min(r, max(n, 1)), v, device=logits.device, dtype=torch.float32)
        for r0 in range(0, n, r):
            r1 = min(n, r0 + r)
            z = buf[: r1 - r0]
            z.copy_(logits[r0:r1])
            if inv_t != 1.0:
                z.mul_(inv_t)
            z.sub_(lse[r0:r1, None]).clamp_(min=EXP_FLOOR).exp_().mul_(-g[r0:r1, None])
            hit = valid[r0:r1].nonzero().squeeze(1)                     # + g onehot (in fp32)
            z.index_put_((hit, targets[r0:r1][hit]), g[r0:r1][hit], accumulate=True)
            grad[r0:r1].copy_(z)
        return grad, None, None, None, None


def selected_logprobs_from_logits(logits, targets, *, ignore_index=-100, temperature=1.0,
                                  row_chunk=None):
    return LogprobsFromLogits.apply(logits, targets, temperature, ignore_index, row_chunk)
