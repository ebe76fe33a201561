"""Triton kernels for selected-token log-probs (CUDA default; CPU only under TRITON_INTERPRET=1).

Same contract and math as kernels/torch_impl.py (see its docstring for the derivation):
z = (h @ W^T + b) / T, lse, logp = z[t] - lse, entropy H = lse - S with S = sum p z,
dz = g (onehot - p) - gH p (z - S), dlogits = dz / T.

Kernels (one program = one tile of rows x one range of vocabulary; [N, V] is never stored):
  _fwd_kernel     grid (row blocks of BLOCK_N, vocab splits). Loops over its vocabulary range in
                  BLOCK_V tiles; each tile's logits come from tl.dot(h_tile, w_tile^T) with a
                  K loop over H in BLOCK_H; online max / sum exp / sum exp*(z - max) and the target
                  logit pick. Writes per-(split, row) partials [4, splits, N]; a tiny torch step
                  merges the splits into lse, entropy and S (splits give parallelism when N is
                  small: a few thousand rows are only a few dozen row blocks).
  _bwd_dh_kernel  grid (row blocks, vocab splits): recomputes each tile, forms dlogits, and adds
                  dlogits @ W_tile into an fp32 grad_hidden [N, H] (atomic_add when splits > 1).
  _bwd_dw_kernel  grid (vocab blocks, row splits): recomputes each tile, adds dlogits^T @ h into
                  an fp32 grad_W [V, H] and sums dlogits into grad_b (atomic_add when row splits
                  > 1). [ours] Two kernels, i.e. the logits are recomputed twice when both grads are
                  needed (flash-attention-2 style), instead of one kernel with atomics on grad_W
                  from every row block; with a frozen lm_head (LoRA) only _bwd_dh_kernel runs.

Precision: accumulators are fp32. fp32 inputs use input_precision="ieee" (no TF32), bf16/fp16
inputs use tensor-core dots with fp32 accumulation, and the backward casts dlogits to the input
dtype for its two dots (as Liger-Kernel does). Under TRITON_INTERPRET=1, bf16 operands are upcast
to fp32 before tl.dot because the interpreter multiplies raw bf16 bit patterns
(triton-lang/triton#11584, "we just don't support it yet").

Precision paths (precision_path(); the name is kept in LAST_PATH for the tests and the GPU check):
  "fp32-ieee"         fp32 inputs: ieee dots (no TF32), fp32 dlogits in the backward dots
  "bf16-tensorcore"   bf16 / fp16 inputs on CUDA: tensor-core dots of the input dtype with fp32
                      accumulation; the backward rounds the fp32 dlogits to the input dtype for
                      its two dots; grad_hidden / grad_W accumulate in fp32, returned in the input
                      dtype. Only a GPU runs it (scripts/gpu_check.sh part 1).
  "bf16-interpreter"  bf16 under TRITON_INTERPRET=1: operands upcast to fp32 first (below)
Any other dtype is a ValueError.

Block sizes (tune()): on CUDA the first call for a (V, H, dtype, N bucket, grads) key times
each of CONFIGS that fits the shape on the real inputs (forward + the grad_hidden backward,
triton.testing.do_bench) and keeps the fastest for the process; EXPCTR_TRITON_AUTOTUNE=0 uses
CONFIG. The candidates are sized for the heads of the supported models (SmolLM2-135M: V 49,152,
H 576; Qwen2.5-1.5B: V 151,936, H 1,536). Explicit block overrides skip the tuning (tests).
Under the interpreter, CONFIG is used unless a timer is passed to tune() (tests).

Untested on a GPU in this repository (no GPU was available): tests/test_kernels.py runs these
kernels, every candidate config and the tuner's selection under the interpreter.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# The interpreter is chosen when @triton.jit runs, i.e. when this module is imported.
INTERPRET = bool(getattr(getattr(triton, "knobs", None), "runtime", None)
                 and triton.knobs.runtime.interpret) or os.environ.get("TRITON_INTERPRET") == "1"

CONFIG = dict(block_n=64, block_v=128, block_h=64, num_warps=8,
              programs=None)   # programs: target grid size for split heuristics (None: 4 x SMs)
# [ours] the tuner's candidates (block_n, block_v, block_h, num_warps): tensor-core tiles of
# 32..128 rows x 64..256 vocabulary columns x 32..128 of H (576 = 9 x 64: block_h 128 runs a
# masked last K tile there; 1,536 = 12 x 128); every dim >= 16, as tl.dot needs
CONFIGS = [dict(block_n=bn, block_v=bv, block_h=bh, num_warps=nw) for bn, bv, bh, nw in (
    (64, 128, 64, 8), (64, 128, 64, 4), (128, 128, 64, 8), (64, 256, 64, 8),
    (32, 128, 64, 4), (128, 64, 64, 4), (64, 128, 128, 8), (128, 256, 32, 8))]
LAST_PATH = None     # the precision path of the latest launch (precision_path())
_TUNED: dict = {}    # tune() cache: key -> (config, {_cfg_id(candidate): seconds})


# ---- algorithm: shared tile helpers ----
@triton.jit
def _mm(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b with fp32 accumulation; IEEE: full fp32 products (no TF32) for fp32 inputs."""
    if IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _grad_tile(dl, x, M: tl.constexpr, K: tl.constexpr, DOT_F32: tl.constexpr,
               IEEE: tl.constexpr):
    """dl [M, .] @ x [., K] as an fp32 [M, K] tile: dl (fp32 dlogits) times the other input's
    tile; DOT_F32 (fp32 inputs) keeps dl in fp32, else dl is cast to x's dtype (bf16 on CUDA)."""
    acc = tl.zeros((M, K), tl.float32)
    if DOT_F32:
        return _mm(dl, x.to(tl.float32), acc, IEEE)
    return _mm(dl.to(x.dtype), x, acc, IEEE)


@triton.jit
def _add_tile(ptrs, part, msk, ATOMIC: tl.constexpr):
    """*ptrs += part: atomically where several programs add into the same tile (forced splits)."""
    if ATOMIC:
        tl.atomic_add(ptrs, part, mask=msk)
    else:
        tl.store(ptrs, tl.load(ptrs, mask=msk, other=0.0) + part, mask=msk)


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H, stride_h, stride_w, inv_t,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_H: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr):
    """z = (h[rows] @ W[cols]^T + b[cols]) / T as an fp32 [BLOCK_N, BLOCK_V] tile."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        kmask = ks < H
        h = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :],
                    mask=row_mask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * stride_w + ks[None, :],
                    mask=col_mask[:, None] & kmask[None, :], other=0.0)
        if DOT_F32:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = _mm(h, tl.trans(w), acc, IEEE)
    if HAS_BIAS:
        bv = tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        acc = acc + bv[None, :]
    return acc * inv_t


@triton.jit
def _row_stats(t_ptr, lse_ptr, s_ptr, g_ptr, ge_ptr, rows, row_mask, ENTROPY: tl.constexpr):
    """Per-row inputs of backward: target, lse, S (= lse without entropy), g, g_entropy."""
    tgt = tl.load(t_ptr + rows, mask=row_mask, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_mask, other=0.0)
    big_s = lse
    ge = g
    if ENTROPY:
        big_s = tl.load(s_ptr + rows, mask=row_mask, other=0.0)
        ge = tl.load(ge_ptr + rows, mask=row_mask, other=0.0)
    return tgt, lse, big_s, g, ge


@triton.jit
def _dlogits_tile(z, cols, col_mask, row_mask, tgt, lse, big_s, g, ge, inv_t,
                  ENTROPY: tl.constexpr):
    """dlogits = (g (onehot - p) - gH p (z - S)) / T; 0 outside the valid rows / columns."""
    p = tl.exp(z - lse[:, None])
    if ENTROPY:
        dz = -p * (g[:, None] + ge[:, None] * (z - big_s[:, None]))
    else:
        dz = -p * g[:, None]
    ok = row_mask[:, None] & col_mask[None, :]
    dz = tl.where(ok & (p > 0), dz, 0.0)          # p == 0: also drops -inf logits (no NaN)
    hit = ok & (cols[None, :] == tgt[:, None])
    dz = dz + tl.where(hit, g[:, None], 0.0)
    return dz * inv_t


# ---- algorithm: forward (online log-sum-exp + entropy, target pick) ----
@triton.jit
def _fwd_kernel(h_ptr, w_ptr, b_ptr, t_ptr, stats_ptr, N, V, H, stride_h, stride_w, inv_t,
                v_per_split,
                HAS_BIAS: tl.constexpr, ENTROPY: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_F32: tl.constexpr,
                IEEE: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_splits = tl.num_programs(1)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_mask = rows < N
    tgt = tl.load(t_ptr + rows, mask=row_mask, other=-1)      # -1: ignored row
    m = tl.full((BLOCK_N,), -1e30, tl.float32)   # finite start keeps (m_old - m_new) * s at 0
    s = tl.zeros((BLOCK_N,), tl.float32)
    sd = tl.zeros((BLOCK_N,), tl.float32)
    zt = tl.zeros((BLOCK_N,), tl.float32)
    v_lo = pid_s * v_per_split
    v_hi = tl.minimum(v_lo + v_per_split, V)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_mask = cols < v_hi
        z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H, stride_h,
                         stride_w, inv_t, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, DOT_F32, IEEE)
        m_new = tl.maximum(m, tl.max(tl.where(col_mask[None, :], z, float("-inf")), axis=1))
        d = z - m_new[:, None]
        e = tl.where(col_mask[None, :], tl.exp(d), 0.0)
        alpha = tl.exp(m - m_new)
        if ENTROPY:   # sum e * (z - m), rescaled to the new max, plus this tile
            sd = alpha * (sd + (m - m_new) * s) + tl.sum(tl.where(e > 0, e * d, 0.0), axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new
        hit = col_mask[None, :] & (cols[None, :] == tgt[:, None])
        zt += tl.sum(tl.where(hit, z, 0.0), axis=1)
    base = pid_s * N + rows
    plane = n_splits * N
    tl.store(stats_ptr + base, m, mask=row_mask)
    tl.store(stats_ptr + plane + base, s, mask=row_mask)
    tl.store(stats_ptr + 2 * plane + base, sd, mask=row_mask)
    tl.store(stats_ptr + 3 * plane + base, zt, mask=row_mask)


# ---- algorithm: backward, grad_hidden (recompute tiles) ----
@triton.jit
def _bwd_dh_kernel(h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, s_ptr, g_ptr, ge_ptr, gh_ptr,
                   N, V, H, stride_h, stride_w, stride_gh, inv_t, v_per_split,
                   HAS_BIAS: tl.constexpr, ENTROPY: tl.constexpr, ATOMIC: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                   DOT_F32: tl.constexpr, IEEE: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_mask = rows < N
    tgt, lse, big_s, g, ge = _row_stats(t_ptr, lse_ptr, s_ptr, g_ptr, ge_ptr, rows, row_mask,
                                        ENTROPY)
    v_lo = pid_s * v_per_split
    v_hi = tl.minimum(v_lo + v_per_split, V)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_mask = cols < v_hi
        z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H, stride_h,
                         stride_w, inv_t, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, DOT_F32, IEEE)
        dl = _dlogits_tile(z, cols, col_mask, row_mask, tgt, lse, big_s, g, ge, inv_t, ENTROPY)
        for k0 in range(0, H, BLOCK_H):
            ks = k0 + tl.arange(0, BLOCK_H)
            kmask = ks < H
            w = tl.load(w_ptr + cols[:, None] * stride_w + ks[None, :],
                        mask=col_mask[:, None] & kmask[None, :], other=0.0)
            part = _grad_tile(dl, w, BLOCK_N, BLOCK_H, DOT_F32, IEEE)
            _add_tile(gh_ptr + rows[:, None] * stride_gh + ks[None, :], part,
                      row_mask[:, None] & kmask[None, :], ATOMIC)


# ---- algorithm: backward, grad_weight / grad_bias (recompute tiles) ----
@triton.jit
def _bwd_dw_kernel(h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, s_ptr, g_ptr, ge_ptr, gw_ptr, gb_ptr,
                   N, V, H, stride_h, stride_w, stride_gw, inv_t, n_per_split,
                   HAS_BIAS: tl.constexpr, NEED_W: tl.constexpr, NEED_B: tl.constexpr,
                   ENTROPY: tl.constexpr, ATOMIC: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_F32: tl.constexpr,
                   IEEE: tl.constexpr):
    pid_v = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = (pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    col_mask = cols < V
    gb_acc = tl.zeros((BLOCK_V,), tl.float32)
    n_lo = pid_s * n_per_split
    n_hi = tl.minimum(n_lo + n_per_split, N)
    for r0 in range(n_lo, n_hi, BLOCK_N):
        rows = (r0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        row_mask = rows < n_hi
        tgt, lse, big_s, g, ge = _row_stats(t_ptr, lse_ptr, s_ptr, g_ptr, ge_ptr, rows,
                                            row_mask, ENTROPY)
        z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, H, stride_h,
                         stride_w, inv_t, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, DOT_F32, IEEE)
        dl = _dlogits_tile(z, cols, col_mask, row_mask, tgt, lse, big_s, g, ge, inv_t, ENTROPY)
        if NEED_B:
            gb_acc += tl.sum(dl, axis=0)
        if NEED_W:
            dlt = tl.trans(dl)
            for k0 in range(0, H, BLOCK_H):
                ks = k0 + tl.arange(0, BLOCK_H)
                kmask = ks < H
                h = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :],
                            mask=row_mask[:, None] & kmask[None, :], other=0.0)
                part = _grad_tile(dlt, h, BLOCK_V, BLOCK_H, DOT_F32, IEEE)
                _add_tile(gw_ptr + cols[:, None] * stride_gw + ks[None, :], part,
                          col_mask[:, None] & kmask[None, :], ATOMIC)
    if NEED_B:
        if ATOMIC:
            tl.atomic_add(gb_ptr + cols, gb_acc, mask=col_mask)
        else:
            tl.store(gb_ptr + cols, gb_acc, mask=col_mask)


# ---- plumbing: launch configuration ----
def _cfg(overrides):
    cfg = dict(CONFIG)
    cfg.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return cfg


def _target_programs(cfg, device):
    if cfg["programs"]:
        return int(cfg["programs"])
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _split(total, block, other_blocks, target, forced):
    """Split `total` items (in whole blocks) into ranges so that other_blocks x ranges ~ target."""
    blocks = triton.cdiv(total, block)
    want = forced or max(1, triton.cdiv(target, max(other_blocks, 1)))
    per = triton.cdiv(blocks, max(1, min(blocks, want))) * block        # multiple of block
    return per, triton.cdiv(total, per)


def precision_path(dtype: torch.dtype, interpret: bool = INTERPRET) -> tuple[str, dict]:
    """The kernels' precision path for an input dtype (module docstring) -> (name, constexpr
    flags): DOT_F32 upcasts the dot operands to fp32 (dlogits stay fp32), IEEE asks for full
    fp32 products (no TF32)."""
    if dtype == torch.float32:
        return "fp32-ieee", dict(DOT_F32=False, IEEE=True)
    if dtype in (torch.bfloat16, torch.float16):
        if interpret:   # the interpreter multiplies raw bf16 bit patterns (triton#11584)
            return "bf16-interpreter", dict(DOT_F32=True, IEEE=False)
        return "bf16-tensorcore", dict(DOT_F32=False, IEEE=False)
    raise ValueError(f"kernels: the triton kernels take float32, bfloat16 or float16 inputs, "
                     f"not {dtype}")


def _flags(hidden):
    global LAST_PATH
    LAST_PATH, flags = precision_path(hidden.dtype)
    return flags


def _row_grid(hidden, weight, cfg):
    """The row-block x vocabulary-split grid of the forward and grad_hidden kernels ->
    (row blocks, vocabulary per split, splits)."""
    n_blocks = triton.cdiv(max(hidden.shape[0], 1), cfg["block_n"])
    v_per, splits = _split(weight.shape[0], cfg["block_v"], n_blocks,
                           _target_programs(cfg, hidden.device), cfg.get("v_splits"))
    return n_blocks, v_per, splits


def _kernel_targets(targets, ignore_index):
    """(valid rows, targets with -1 on ignored rows), as the kernels read them."""
    valid = targets != ignore_index
    return valid, torch.where(valid, targets, -1).contiguous()


def _launch_fwd(hidden, weight, bias, tk, inv_t, entropy, cfg):
    """The forward kernel over its grid -> per-split partial stats [4, splits, N]."""
    n, hdim = hidden.shape
    n_blocks, v_per, splits = _row_grid(hidden, weight, cfg)
    stats = torch.empty(4, splits, n, device=hidden.device, dtype=torch.float32)
    if n:
        _fwd_kernel[(n_blocks, splits)](
            hidden, weight, bias if bias is not None else weight, tk, stats, n, weight.shape[0],
            hdim, hidden.stride(0), weight.stride(0), inv_t, v_per,
            **_common(hidden, bias, entropy, cfg))
    return stats


def _launch_dh(hidden, weight, bias, tk, lse, s_arg, g, ge, inv_t, entropy, cfg):
    """grad_hidden (fp32 [N, H]) from the recomputed tiles."""
    n, hdim = hidden.shape
    gh = torch.zeros(n, hdim, device=hidden.device, dtype=torch.float32)
    n_blocks, v_per, splits = _row_grid(hidden, weight, cfg)
    if n:
        _bwd_dh_kernel[(n_blocks, splits)](
            hidden, weight, bias if bias is not None else weight, tk, lse, s_arg, g, ge, gh, n,
            weight.shape[0], hdim, hidden.stride(0), weight.stride(0), gh.stride(0), inv_t, v_per,
            ATOMIC=splits > 1, **_common(hidden, bias, entropy, cfg))
    return gh


def _launch_dw(hidden, weight, bias, tk, lse, s_arg, g, ge, inv_t, entropy, cfg, need_w, need_b):
    """grad_W (fp32 [V, H], or [1, H] unused) and grad_b (fp32 [V], or [1] unused)."""
    n, hdim = hidden.shape
    v = weight.shape[0]
    gw32 = torch.zeros(v if need_w else 1, hdim, device=hidden.device, dtype=torch.float32)
    gb32 = torch.zeros(v if need_b else 1, device=hidden.device, dtype=torch.float32)
    v_blocks = triton.cdiv(v, cfg["block_v"])
    n_per, splits = _split(max(n, 1), cfg["block_n"], v_blocks, _target_programs(cfg, hidden.device),
                           cfg.get("n_splits"))
    if n:
        _bwd_dw_kernel[(v_blocks, splits)](
            hidden, weight, bias if bias is not None else weight, tk, lse, s_arg, g, ge, gw32,
            gb32, n, v, hdim, hidden.stride(0), weight.stride(0), gw32.stride(0), inv_t, n_per,
            NEED_W=bool(need_w), NEED_B=bool(need_b), ATOMIC=splits > 1,
            **_common(hidden, bias, entropy, cfg))
    return gw32, gb32


def _common(hidden, bias, entropy, cfg):
    return dict(HAS_BIAS=bias is not None, ENTROPY=bool(entropy), BLOCK_N=cfg["block_n"],
                BLOCK_V=cfg["block_v"], BLOCK_H=cfg["block_h"], num_warps=cfg["num_warps"],
                **_flags(hidden))


def _merge(stats, valid, entropy):
    """Merge the vocabulary splits (tiny: [splits, N]) -> logp, entropy, lse, S."""
    m, s, sd, zt = stats.unbind(0)
    big_m = m.amax(0)
    wk = torch.exp(m - big_m)
    s_tot = (wk * s).sum(0)
    log_s = torch.log(s_tot)
    lse = big_m + log_s
    logp = torch.where(valid, zt.sum(0) - lse, 0.0)
    ent = big_s = None
    if entropy:
        sd_tot = (wk * (sd + (m - big_m) * s)).sum(0)
        ent_all = log_s - sd_tot / s_tot
        big_s = lse - ent_all
        ent = torch.where(valid, ent_all, 0.0)
    return logp, ent, lse, big_s


class SelectedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, ignore_index, entropy, cfg):
        if hidden.device.type != "cuda" and not INTERPRET:
            raise RuntimeError("kernels: the triton implementation needs CUDA tensors, or "
                               "TRITON_INTERPRET=1 set before triton is imported (CPU interpreter)")
        inv_t = 1.0 / float(temperature)
        valid, tk = _kernel_targets(targets, ignore_index)
        stats = _launch_fwd(hidden, weight, bias, tk, inv_t, entropy, cfg)
        logp, ent, lse, big_s = _merge(stats, valid, entropy)
        ctx.save_for_backward(hidden, weight, bias, tk, valid, lse, big_s)
        ctx.cfg = (cfg, inv_t)
        if entropy:
            return logp, ent
        empty = lse.new_empty(0)
        ctx.mark_non_differentiable(empty)
        return logp, empty

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_logp, g_ent):
        hidden, weight, bias, tk, valid, lse, big_s = ctx.saved_tensors
        cfg, inv_t = ctx.cfg
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and bias is not None
        g = (torch.where(valid, g_logp.float(), 0.0) if g_logp is not None
             else torch.zeros_like(lse)).contiguous()
        entropy = big_s is not None and g_ent is not None and g_ent.numel() > 0
        ge = torch.where(valid, g_ent.float(), 0.0).contiguous() if entropy else g
        s_arg = big_s if entropy else lse
        gh = gw = gb = None
        if need_h:
            gh = _launch_dh(hidden, weight, bias, tk, lse, s_arg, g, ge, inv_t, entropy,
                            cfg).to(hidden.dtype)
        if need_w or need_b:
            gw32, gb32 = _launch_dw(hidden, weight, bias, tk, lse, s_arg, g, ge, inv_t, entropy,
                                    cfg, need_w, need_b)
            gw = gw32.to(weight.dtype) if need_w else None
            gb = gb32.to(bias.dtype) if need_b else None
        return gh, gw, gb, None, None, None, None, None


# ---- plumbing: block sizes by a small autotune (CUDA) ----
def _pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _bench(fn) -> float:
    """Seconds per call on CUDA (triton.testing.do_bench: warm-up, then the mean of timed runs)."""
    return triton.testing.do_bench(fn, warmup=5, rep=25) / 1e3


def _cfg_id(c: dict) -> tuple:
    """(block_n, block_v, block_h, num_warps): how the tuner's timings name a config."""
    return c["block_n"], c["block_v"], c["block_h"], c["num_warps"]


def tune_key(hidden, weight, bias, entropy, need_w) -> tuple:
    """What a tuned choice is kept for: the head's V and H, dtype, N rounded up to a power of 2
    (at most 65,536), bias, entropy and grad_W (they change the kernels' work), device."""
    return (weight.shape[0], hidden.shape[1], str(hidden.dtype), min(_pow2(hidden.shape[0]), 1 << 16),
            bias is not None, bool(entropy), bool(need_w), str(hidden.device))


def tune(hidden, weight, bias, targets, *, temperature=1.0, ignore_index=-100, entropy=False,
         need_w=False, configs=None, timer=None) -> dict:
    """[ours] The fastest of `configs` (default CONFIGS, those whose tiles fit the shape) for
    this call's shapes, timed on its own inputs: the forward, then the grad_hidden backward with
    unit upstream gradients (and grad_W if the head trains). Cached per tune_key for the process.
    timer(fn) -> seconds (default: do_bench on CUDA; tests pass a fake one under the interpreter)."""
    key = tune_key(hidden, weight, bias, entropy, need_w)
    if key in _TUNED:
        return _TUNED[key][0]
    n, hdim = hidden.shape
    v = weight.shape[0]
    cands = [c for c in (configs or CONFIGS) if c["block_v"] <= _pow2(v) and
             c["block_h"] <= _pow2(hdim) and c["block_n"] <= max(16, _pow2(n))] or [CONFIG]
    inv_t = 1.0 / float(temperature)
    valid, tk = _kernel_targets(targets, ignore_index)
    ones = torch.ones(n, device=hidden.device, dtype=torch.float32)
    times = []
    for c in cands:
        cfg = _cfg(c)

        def run(cfg=cfg):
            _, _, lse, big_s = _merge(_launch_fwd(hidden, weight, bias, tk, inv_t, entropy, cfg),
                                      valid, entropy)
            s_arg = big_s if entropy else lse
            _launch_dh(hidden, weight, bias, tk, lse, s_arg, ones, ones, inv_t, entropy, cfg)
            if need_w:
                _launch_dw(hidden, weight, bias, tk, lse, s_arg, ones, ones, inv_t, entropy, cfg,
                           True, bias is not None)
        times.append(float((timer or _bench)(run)))
    best = min(range(len(cands)), key=times.__getitem__)
    _TUNED[key] = (dict(cands[best]), {_cfg_id(c): t for c, t in zip(cands, times)})
    return _TUNED[key][0]


def use_tuner(device_type: str, overrides: dict) -> bool:
    """Tune the blocks for this call? On CUDA (not the interpreter), with the tuner on
    (EXPCTR_TRITON_AUTOTUNE != 0) and no block size given by the caller."""
    return (device_type == "cuda" and not INTERPRET
            and os.environ.get("EXPCTR_TRITON_AUTOTUNE", "1") != "0"
            and all(overrides.get(k) is None for k in ("block_n", "block_v", "block_h", "num_warps")))


def selected_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100,
                      return_entropy=False, **overrides):
    """2-D contiguous inputs (kernels/__init__.py flattens and validates). `overrides` may set
    block_n / block_v / block_h / num_warps / programs / v_splits / n_splits (tests use tiny
    blocks and forced splits so the interpreter covers the split-merge and atomic paths). Without
    block overrides, on CUDA, the block sizes come from tune() (EXPCTR_TRITON_AUTOTUNE=0: CONFIG)."""
    hidden, weight = hidden.contiguous(), weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    precision_path(hidden.dtype)   # an unsupported dtype is a clear error before any launch
    if use_tuner(hidden.device.type, overrides):
        with torch.no_grad():
            overrides = dict(overrides, **tune(
                hidden, weight, bias, targets, temperature=temperature, ignore_index=ignore_index,
                entropy=return_entropy, need_w=weight.requires_grad and torch.is_grad_enabled()))
    logp, ent = SelectedLogprobs.apply(hidden, weight, bias, targets,
                                       temperature, ignore_index, bool(return_entropy),
                                       _cfg(overrides))
    return (logp, ent) if return_entropy else logp
