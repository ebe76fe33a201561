"""Pure-torch twin of the fused selected-token log-prob kernels (CPU default, CUDA fallback).

Same contract as kernels.selected_logprobs (see kernels/__init__.py). The [N, V] logits are never
held: the vocabulary is walked in tiles of `vocab_tile` columns and the rows in chunks of
`row_chunk`; the only V-sized scratch is one (two with entropy) fp32 buffer of
row_chunk x vocab_tile (default 1024 x 8192 = 32 MiB). Notation: z = logits / T, tile k covers
the columns C_k.

Forward, per tile (log-sum-exp over tiles, merged exactly at the end):
    lse_k = logsumexp_{j in C_k} z_j       = max(z) - log(max(softmax_k(z)))
    H_k   = -sum_j p_kj log p_kj            with p_k = softmax over the tile (entropy only)
    zt    = z[target]                       picked in the tile that holds the target
then lse = logsumexp_k lse_k, logp = zt - lse, and with tile masses w_k = exp(lse_k - lse) the
entropy of the full softmax is the mixture entropy H = sum_k w_k (H_k - log w_k) (no cancellation).
Saved for backward: lse_k per (tile, row) [n_tiles, N] and S = sum_j p_j z_j = lse - H.

Backward (general case) recomputes each tile; p_j = softmax_k(z)_j * w_k:
    d logp / d z_j    = onehot_j - p_j
    d entropy / d z_j = -p_j (z_j - S)        (H = lse - S; dS/dz_j = p_j (1 + z_j - S))
    dz  = g (onehot - p) - gH p (z - S),   dlogits = dz / T
    grad_hidden = sum_k dlogits_k @ W_k,  grad_W_k = dlogits_k^T @ hidden,  grad_b = sum_rows
The onehot part is added from W[t] / hidden rows directly (no [N, V] scatter).

Eager mode [ours] (hidden requires grad, lm_head weight and bias frozen, e.g. LoRA PPO): every
row's gradient is its upstream scalar times a vector that does not depend on the upstream grads,
    grad_hidden_i = g_i u_i + gH_i u2_i,   u_i  = (W[t_i] - E_p[W]) / T,
                                           u2_i = -(E_p[z W] - S_i E_p[W]) / T,
so the forward pass accumulates E_p[W] (and E_p[z W]) tile by tile, flash-attention style
(running log-sum-exp, rescaled [N, H] accumulators), saves u (u2) [N, H], and backward is one
multiply: one extra GEMM in forward (two with entropy) instead of two in backward, i.e. the
same GEMM count as the naive path. When the weight or bias needs a gradient, the recompute path
above is used (grad_W needs the upstream grads of all rows).

Why these ops: per tile the work is one GEMM plus a few fused ATen row ops (softmax, amax,
log_softmax for entropy, one mul). ATen's fused (log_)softmax handle wide logit ranges without
the ~30x slowdown a plain exp_ suffers when its results are subnormal, and few large ops matter on
a busy 2-core CPU, where each parallel op can wait a scheduler tick for its second thread. The
softmax ops run with out= aliasing their input (in place); tests check results against float64.

Loop order: vocabulary tiles outside, row chunks inside, so a grad_W tile is finished (and cast to
the weight dtype) before the next tile: no full fp32 [V, H] buffer for bf16 weights. 1/T is
folded into the fp32 weight tile (z = h @ (W/T)^T + b/T), so grad_hidden needs no extra pass.

Everything is accumulated in fp32 whatever the input dtype: bf16 tiles are upcast before the
matmul. [ours] On a CPU with native bf16 GEMM this is slower than a bf16 matmul with bf16 output,
but a bf16 logit carries an error of up to |z| * 2^-9 (~0.06 at z = 30), too coarse for PPO ratios.
-inf bias entries (a masked vocabulary) are clamped to -1e30 after scaling by 1/T, which keeps
every product finite.
"""
from __future__ import annotations

import torch

ROW_CHUNK = 1024          # rows per chunk (CPU-tuned: large chunks keep the GEMM efficient)
VOCAB_TILE = 8192         # vocabulary columns per tile
TILE_ELEMS = 1 << 23      # when N is small, widen the vocab tile up to this many elements (32 MiB)
NEG_BIG = -1e30           # floor for -inf bias entries


def _tiles(n: int, v: int, row_chunk: int | None, vocab_tile: int | None) -> tuple[int, int]:
    r = max(1, min(n, row_chunk or ROW_CHUNK))
    vt = vocab_tile or max(VOCAB_TILE, TILE_ELEMS // r)
    return r, max(1, min(v, vt))


def _mat(flat, rows, cols):
    """A contiguous [rows, cols] view at the start of a flat scratch buffer."""
    return flat[: rows * cols].view(rows, cols)


def _weight_tile(weight, bias, v0, v1, inv_t):
    """fp32 W[v0:v1] / T (a view, no copy, when already fp32 and T == 1) and b[v0:v1] / T."""
    w = weight[v0:v1]
    w = w.float() if inv_t == 1.0 else w.float() * inv_t
    b = None
    if bias is not None:
        b = bias[v0:v1].float()
        b = (b * inv_t if inv_t != 1.0 else b.clone()).clamp_(min=NEG_BIG)
    return w, b


def _rows32(hidden, r0, r1, hbuf):
    """fp32 hidden[r0:r1] (a view when hidden is fp32, else copied into the reusable hbuf)."""
    h = hidden[r0:r1]
    if h.dtype == torch.float32:
        return h
    out = hbuf[: r1 - r0]
    out.copy_(h)
    return out


def _logits(hc, w, b, out):
    if b is None:
        return torch.mm(hc, w.t(), out=out)
    return torch.addmm(b, hc, w.t(), out=out)


def _in_tile(tc, valid, vt):
    """Row indices (within the chunk) whose target falls in the current tile."""
    return ((tc >= 0) & (tc < vt) & valid).nonzero().squeeze(1)


# ---- algorithm: forward statistics (per-tile log-sum-exp and entropy, merged over tiles) ----
def forward_stats(hidden, weight, bias, targets, valid, inv_t, entropy, eager=False,
                  row_chunk=None, vocab_tile=None):
    """Returns dict(logp [N], lse [N], lse_t [n_tiles, N], ent [N] or None, u, u2 [N, H] or None),
    fp32; ignored rows give logp = ent = 0. eager: also the hidden-gradient vectors u (u2)."""
    n, hdim = hidden.shape
    v = weight.shape[0]
    f32 = dict(device=hidden.device, dtype=torch.float32)
    r, vt = _tiles(n, v, row_chunk, vocab_tile)
    n_tiles = -(-v // vt)
    lse_t = torch.zeros(n_tiles, n, **f32)
    ent_t = torch.zeros(n_tiles, n, **f32) if entropy else None
    zt = torch.zeros(n, **f32)
    buf = torch.empty(r * vt if n else 0, **f32)
    buf2 = torch.empty(r * vt if n else 0, **f32) if entropy else None
    hbuf = torch.empty(r, hdim, **f32) if hidden.dtype != torch.float32 else None
    if eager:                          # running lse, E_p[W/T] and E_p[(z - lse) W/T] per row
        run = torch.full((n,), NEG_BIG, **f32)
        acc = torch.zeros(n, hdim, **f32)
        acc2 = torch.zeros(n, hdim, **f32) if entropy else None
        tmp = torch.empty(r, hdim, **f32)
        tmp2 = torch.empty(r, hdim, **f32) if entropy else None
    for k, v0 in enumerate(range(0, v, vt) if n else ()):
        v1 = min(v, v0 + vt)
        w, b = _weight_tile(weight, bias, v0, v1, inv_t)
        for r0 in range(0, n, r):
            r1 = min(n, r0 + r)
            z = _logits(_rows32(hidden, r0, r1, hbuf), w, b, _mat(buf, r1 - r0, v1 - v0))
            hit = _in_tile(targets[r0:r1] - v0, valid[r0:r1], v1 - v0)
            if hit.numel():                                     # pick the target logit
                zt[r0:r1].index_copy_(0, hit, z[hit, targets[r0:r1][hit] - v0])
            zmax = z.amax(1)
            if entropy:
                logsm = torch.log_softmax(z, 1, out=_mat(buf2, r1 - r0, v1 - v0))
            p = torch.softmax(z, 1, out=z)                      # in place
            lse_k = zmax - torch.log(p.amax(1))                 # max p = 1 / sum exp(z - max)
            lse_t[k, r0:r1] = lse_k
            if entropy:
                ent_t[k, r0:r1] = -torch.linalg.vecdot(p, logsm)
            if eager:                                           # flash-style rescaled sums
                old = run[r0:r1]
                new = torch.logaddexp(old, lse_k)
                alpha, beta = torch.exp(old - new)[:, None], torch.exp(lse_k - new)[:, None]
                p1 = torch.mm(p, w, out=tmp[: r1 - r0])         # sum_j p_kj W_j / T
                if entropy:   # acc2 = sum p (z - run) W / T, centred on the running lse
                    p2 = torch.mm(logsm.mul_(p), w, out=tmp2[: r1 - r0])   # logsm = z - lse_k
                    p2.addcmul_(p1, (lse_k - new)[:, None])
                    a2 = acc2[r0:r1]
                    a2.addcmul_(acc[r0:r1], (old - new)[:, None]).mul_(alpha).addcmul_(p2, beta)
                acc[r0:r1].mul_(alpha).addcmul_(p1, beta)
                run[r0:r1] = new
    lse = torch.logsumexp(lse_t, 0)
    out = dict(logp=torch.where(valid, zt - lse, 0.0), lse=lse, lse_t=lse_t, ent=None, u=None,
               u2=None)
    if entropy:                                                 # mixture entropy over tiles
        w_k = torch.exp(lse_t - lse)
        out["ent"] = torch.where(valid, (w_k * (ent_t + (lse - lse_t))).sum(0), 0.0)
    if eager:
        wt = weight.index_select(0, torch.where(valid, targets, 0)).float()
        out["u"] = wt.mul_(inv_t).sub_(acc)                                 # (W[t] - E W) / T
        if entropy:   # -(E[z W] - S E[W]) / T = -(E[(z - lse) W] + H E[W]) / T (S = lse - H)
            out["u2"] = acc2.addcmul_(acc, out["ent"][:, None]).neg_()
    return out


# ---- algorithm: backward (recompute tiles; never holds [N, V]) ----
def backward_grads(hidden, weight, bias, targets, valid, inv_t, lse, lse_t, big_s, g, g_ent,
                   need_h, need_w, need_b, row_chunk=None, vocab_tile=None):
    """g, g_ent: fp32 [N] upstream grads (g_ent None = no entropy term), already 0 on ignored rows.
    Returns (grad_hidden, grad_weight, grad_bias), None where not needed."""
    n, hdim = hidden.shape
    v = weight.shape[0]
    f32 = dict(device=hidden.device, dtype=torch.float32)
    gh = torch.zeros(n, hdim, **f32) if need_h else None
    gw = torch.zeros_like(weight) if need_w else None
    gb = torch.zeros_like(bias) if need_b else None
    if n == 0:
        return gh, gw, gb
    ent = g_ent is not None
    r, vt = _tiles(n, v, row_chunk, vocab_tile)
    buf = torch.empty(r * vt, **f32)
    buf2 = torch.empty(r * vt, **f32) if ent else None
    hbuf = torch.empty(r, hdim, **f32) if hidden.dtype != torch.float32 else None
    gw_tile = torch.empty(vt, hdim, **f32) if need_w else None
    gb_tile = torch.empty(vt, **f32) if need_b else None
    if ent:                                  # dz = -p (g + gH (z - S)) = -p (a + gH z)
        a = g - g_ent * big_s
    for k, v0 in enumerate(range(0, v, vt)):
        v1 = min(v, v0 + vt)
        w, b = _weight_tile(weight, bias, v0, v1, inv_t)
        gwt = gw_tile[: v1 - v0].zero_() if need_w else None
        gbt = gb_tile[: v1 - v0].zero_() if need_b else None
        for r0 in range(0, n, r):
            r1 = min(n, r0 + r)
            hc = _rows32(hidden, r0, r1, hbuf)
            z = _logits(hc, w, b, _mat(buf, r1 - r0, v1 - v0))
            neg_mass = -torch.exp(lse_t[k, r0:r1] - lse[r0:r1])   # p = softmax_k(z) * w_k
            if ent:
                c = torch.addcmul((neg_mass * a[r0:r1])[:, None], z,
                                  (neg_mass * g_ent[r0:r1])[:, None],
                                  out=_mat(buf2, r1 - r0, v1 - v0))
                x = torch.softmax(z, 1, out=z).mul_(c)          # x = dz without the onehot
            else:
                x = torch.softmax(z, 1, out=z).mul_((neg_mass * g[r0:r1])[:, None])
            if need_h:
                gh[r0:r1].addmm_(x, w)                          # w = W/T: d/dlogits = dz / T
            if need_w:
                gwt.addmm_(x.t(), hc)
            if need_b:
                gbt.add_(x.sum(0))
            if need_w or need_b:                                # + g onehot
                hit = _in_tile(targets[r0:r1] - v0, valid[r0:r1], v1 - v0)
                if hit.numel():
                    cols, gg = targets[r0:r1][hit] - v0, g[r0:r1][hit]
                    if need_w:
                        gwt.index_add_(0, cols, hc[hit] * gg[:, None])
                    if need_b:
                        gbt.index_add_(0, cols, gg)
        if need_w:
            gw[v0:v1].copy_(gwt.mul_(inv_t) if inv_t != 1.0 else gwt)
        if need_b:
            gb[v0:v1].copy_(gbt.mul_(inv_t) if inv_t != 1.0 else gbt)
    if need_h:
        wt = weight.index_select(0, torch.where(valid, targets, 0)).float()   # + g W[t] / T
        gh.addcmul_(wt, (g * inv_t)[:, None])                   # (g = 0 on ignored rows)
        gh = gh.to(hidden.dtype)
    return gh, gw, gb


# ---- plumbing: autograd wrappers ----
class SelectedLogprobs(torch.autograd.Function):
    """(hidden, weight, bias, targets, ...) -> (logp, ent or empty). Hand-written backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, ignore_index, entropy, eager,
                row_chunk, vocab_tile):
        inv_t = 1.0 / float(temperature)
        valid = targets != ignore_index
        st = forward_stats(hidden, weight, bias, targets, valid, inv_t, entropy, eager,
                           row_chunk, vocab_tile)
        big_s = (st["lse"] - st["ent"]) if entropy else None    # S = sum p z = lse - H
        if eager:                                               # backward needs only u, u2
            ctx.save_for_backward(valid, st["u"], st["u2"])
        else:
            ctx.save_for_backward(hidden, weight, bias, targets, valid, st["lse"], st["lse_t"],
                                  big_s)
        ctx.cfg = (inv_t, eager, row_chunk, vocab_tile, hidden.dtype)
        if entropy:
            return st["logp"], st["ent"]
        empty = st["lse"].new_empty(0)
        ctx.mark_non_differentiable(empty)
        return st["logp"], empty

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_logp, g_ent):
        inv_t, eager, row_chunk, vocab_tile, h_dtype = ctx.cfg
        valid = ctx.saved_tensors[4 if not eager else 0]
        g = (torch.where(valid, g_logp.float(), 0.0) if g_logp is not None
             else torch.zeros(valid.shape, device=valid.device))
        with_ent = g_ent is not None and g_ent.numel() > 0
        ge = torch.where(valid, g_ent.float(), 0.0) if with_ent else None
        if eager:
            _, u, u2 = ctx.saved_tensors
            gh = u * g[:, None]
            if ge is not None and u2 is not None:
                gh.addcmul_(u2, ge[:, None])
            return gh.to(h_dtype), None, None, None, None, None, None, None, None, None
        hidden, weight, bias, targets, valid, lse, lse_t, big_s = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        gh, gw, gb = backward_grads(hidden, weight, bias, targets, valid, inv_t, lse, lse_t,
                                    big_s, g, ge if big_s is not None else None, need_h, need_w,
                                    need_b and bias is not None, row_chunk, vocab_tile)
        return gh, gw, gb, None, None, None, None, None, None, None


def selected_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100,
                      return_entropy=False, row_chunk=None, vocab_tile=None, eager=None):
    """2-D inputs only (the dispatcher in kernels/__init__.py flattens and validates).
    eager=None picks eager mode when only hidden needs a gradient (see module docstring)."""
    if eager is None:
        eager = (torch.is_grad_enabled() and hidden.requires_grad and not weight.requires_grad
                 and not (bias is not None and bias.requires_grad))
    logp, ent = SelectedLogprobs.apply(hidden, weight, bias, targets, temperature, ignore_index,
                                       bool(return_entropy), bool(eager), row_chunk, vocab_tile)
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
        buf = torch.empty(r * v if n else 0, device=logits.device, dtype=torch.float32)
        for r0 in range(0, n, r):
            r1 = min(n, r0 + r)
            z = _scaled_rows(logits, r0, r1, inv_t, buf)        # never modifies the caller's logits
            zmax = z.amax(1)
            logsm = torch.log_softmax(z, 1, out=_mat(buf, r1 - r0, v))
            lse[r0:r1] = zmax - logsm.amax(1)
        safe = torch.where(valid, targets, 0)
        zt = logits.gather(1, safe[:, None]).squeeze(1).float() * inv_t
        logp = torch.where(valid, zt - lse, 0.0)
        ctx.save_for_backward(logits, targets, valid)
        ctx.cfg = (inv_t, r)
        return logp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_logp):
        logits, targets, valid = ctx.saved_tensors
        inv_t, r = ctx.cfg
        n, v = logits.shape
        g = torch.where(valid, g_logp.float(), 0.0) * inv_t      # d/dlogits = d/dz / T
        grad = torch.empty_like(logits)
        buf = torch.empty(min(r, n) * v, device=logits.device, dtype=torch.float32)
        for r0 in range(0, n, r):
            r1 = min(n, r0 + r)
            z = _scaled_rows(logits, r0, r1, inv_t, buf)
            x = torch.softmax(z, 1, out=_mat(buf, r1 - r0, v)).mul_(-g[r0:r1, None])
            hit = valid[r0:r1].nonzero().squeeze(1)                     # + g onehot (in fp32)
            x.index_put_((hit, targets[r0:r1][hit]), g[r0:r1][hit], accumulate=True)
            grad[r0:r1].copy_(x)
        return grad, None, None, None, None


def _scaled_rows(logits, r0, r1, inv_t, buf):
    """fp32 logits[r0:r1] / T: the rows themselves when already fp32 and T == 1, else a copy."""
    rows = logits[r0:r1]
    if rows.dtype == torch.float32 and inv_t == 1.0:
        return rows
    z = _mat(buf, r1 - r0, logits.shape[1])
    z.copy_(rows)
    return z.mul_(inv_t) if inv_t != 1.0 else z


def selected_logprobs_from_logits(logits, targets, *, ignore_index=-100, temperature=1.0,
                                  row_chunk=None):
    return LogprobsFromLogits.apply(logits, targets, temperature, ignore_index, row_chunk)
