"""Fused selected-token log-probs: log p(target) (and entropy) without materialising [N, V] logits.

Used by every reward / PPO step: the scorer's Yes/No answer, each explanation token
under the explainer and the reference model. The plain way (lm_head -> log_softmax -> gather)
holds [N, V] twice; with V = 49,152 (SmolLM2) and a few thousand tokens that is gigabytes.

API
    selected_logprobs(hidden [..., H], weight [V, H], targets [...] (long), *, bias=None [V],
                      temperature=1.0, ignore_index=-100, return_entropy=False, impl=None)
        -> logp [...] float32 (, entropy [...] float32)
        logp = log_softmax((hidden @ weight.T + bias) / temperature)[target]; entropy of the same
        distribution. Rows whose target == ignore_index give 0 and no gradient. Differentiable
        w.r.t. hidden, and weight / bias when they require grad. fp32 accumulation for any input
        dtype (bf16 supported). Leading dims of hidden/targets are flattened and restored.
    selected_logprobs_from_logits(logits [..., V], targets [...], ignore_index=-100,
                                  temperature=1.0) -> logp [...] float32
        For callers that already hold logits: row-chunked, no second [N, V] copy in forward
        (backward returns the [N, V] gradient, which autograd needs anyway).

Dispatch (one contract, three implementations)
    impl argument > env var EXPCTR_LOGPROB_IMPL > automatic:
        automatic = "triton" for CUDA tensors (if triton imports), else "torch".
    "torch"  : kernels/torch_impl.py, rows x vocabulary tiles (default 1024 x 8192, a 32 MiB
               fp32 scratch), hand-written backward. When only `hidden` needs a gradient (frozen
               lm_head, e.g. LoRA) it computes the hidden gradient's per-row vectors during the
               forward pass ("eager", one extra GEMM there, backward is a multiply); otherwise
               backward recomputes the tiles.
    "triton" : kernels/triton_impl.py, Triton forward/backward kernels (recompute in backward);
               on CUDA its block sizes come from a small autotune per (V, H, dtype, N) and each
               dtype takes a named precision path (triton_impl.precision_path).
               On CPU tensors it only runs under TRITON_INTERPRET=1 set before triton is imported
               (the tests do that in a subprocess). triton is imported lazily: `import kernels`
               never needs it. No GPU was available here: it is tested under the interpreter only.
    "naive"  : log_softmax + gather on full logits (reference / benchmark baseline only).
    Rows with ignore_index are dropped before the torch/triton kernels run (index_select, results
    scattered back), so padded prompt positions cost nothing.
    Call it under torch.no_grad() when no gradient is wanted (reference / old-policy log-probs,
    rewards): with grad enabled and hidden requiring grad, the torch twin does the eager work.

Accuracy (tests/test_kernels.py, float64 reference, error relative to max(1, max |ref|)):
fp32 inputs within 1e-5 (values and gradients; logits of magnitude ~300 need 1e-4, their own
fp32 rounding); bf16 inputs: values within 1e-4 of the reference on the same bf16 values
(accumulation is fp32), gradients within 1e-2 (returned in bf16).
"""
from __future__ import annotations

import os
import warnings

import torch

from . import torch_impl

IMPLS = ("torch", "triton", "naive")
ENV_VAR = "EXPCTR_LOGPROB_IMPL"

__all__ = ["selected_logprobs", "selected_logprobs_from_logits", "resolve_impl", "IMPLS",
           "naive_selected_logprobs"]


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        return True
    except Exception:                                   # pragma: no cover - depends on install
        return False


def resolve_impl(impl: str | None = None, device: torch.device | str | None = None) -> str:
    """Which implementation a call with these tensors would use (see module docstring)."""
    name = impl if impl is not None else (os.environ.get(ENV_VAR) or None)
    if name is not None:
        name = name.strip().lower()
        if name not in IMPLS:
            raise ValueError(f"kernels: impl {name!r} (argument or ${ENV_VAR}) is not one of "
                             f"{', '.join(IMPLS)}")
        return name
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        if _triton_importable():
            return "triton"
        warnings.warn("kernels: triton not importable, using the torch implementation on CUDA")
    return "torch"


# ---- algorithm: naive reference (materialises [N, V]; benchmark baseline only) ----
def naive_selected_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0,
                            ignore_index=-100, return_entropy=False):
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0)
    logp = torch.where(valid, logp_all.gather(-1, safe[:, None]).squeeze(-1), 0.0)
    if return_entropy:
        ent = torch.where(valid, -(logp_all.exp() * logp_all).sum(-1), 0.0)
        return logp, ent
    return logp


# ---- plumbing: validation, flattening, ignored-row compaction, dispatch ----
def _check(hidden, weight, targets, bias, temperature):
    if weight.dim() != 2:
        raise ValueError(f"kernels: weight must be [V, H], got shape {tuple(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"kernels: hidden [..., {hidden.shape[-1]}] does not match weight "
                         f"[V, {weight.shape[1]}]")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"kernels: hidden dtype {hidden.dtype} != weight dtype {weight.dtype}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"kernels: targets shape {tuple(targets.shape)} must equal hidden shape "
                         f"without its last dim {tuple(hidden.shape[:-1])}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"kernels: targets must be integer token ids, got {targets.dtype}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"kernels: bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
    if not float(temperature) > 0:
        raise ValueError(f"kernels: temperature must be > 0, got {temperature}")


def _check_range(targets, valid, v):
    bad = valid & ((targets < 0) | (targets >= v))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"kernels: target {int(targets[i])} at row {i} is outside the vocabulary "
                         f"[0, {v}) and is not ignore_index")


def selected_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100,
                      return_entropy=False, impl=None):
    """log p(targets) under softmax((hidden @ weight.T + bias) / temperature). See module doc."""
    _check(hidden, weight, targets, bias, temperature)
    name = resolve_impl(impl, hidden.device)
    lead = targets.shape
    h2 = hidden.reshape(-1, hidden.shape[-1])
    t2 = targets.reshape(-1).long()
    valid = t2 != ignore_index
    _check_range(t2, valid, weight.shape[0])
    kw = dict(bias=bias, temperature=temperature, ignore_index=ignore_index,
              return_entropy=return_entropy)
    if name == "naive":
        out = naive_selected_logprobs(h2, weight, t2, **kw)
    else:
        if name == "triton":
            from . import triton_impl
            fn = triton_impl.selected_logprobs
        else:
            fn = torch_impl.selected_logprobs
        n = t2.shape[0]
        if bool(valid.all()):
            out = fn(h2.contiguous(), weight.contiguous(), t2, **kw)
        else:                                           # compute only the scored rows
            idx = valid.nonzero().squeeze(1)
            res = fn(h2.index_select(0, idx).contiguous(), weight.contiguous(),
                     t2.index_select(0, idx), **kw)
            res = res if return_entropy else (res,)
            out = tuple(r.new_zeros(n).index_copy(0, idx, r) for r in res)
            out = out if return_entropy else out[0]
    if return_entropy:
        return out[0].reshape(lead), out[1].reshape(lead)
    return out.reshape(lead)


def selected_logprobs_from_logits(logits, targets, ignore_index=-100, temperature=1.0):
    """log_softmax(logits / temperature)[target] for callers that already hold logits [..., V];
    row-chunked torch code on every device. Rows with ignore_index give 0 and no gradient."""
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"kernels: targets shape {tuple(targets.shape)} must equal logits shape "
                         f"without its last dim {tuple(logits.shape[:-1])}")
    if not float(temperature) > 0:
        raise ValueError(f"kernels: temperature must be > 0, got {temperature}")
    v = logits.shape[-1]
    _check_range(targets.reshape(-1), targets.reshape(-1) != ignore_index, v)
    return _from_logits(logits, targets.long(), ignore_index, temperature)


def _from_logits(logits, targets, ignore_index, temperature):
    if logits.dim() == 2:
        return torch_impl.selected_logprobs_from_logits(logits, targets, ignore_index=ignore_index,
                                                        temperature=temperature)
    try:                                                # a view: no copy of [..., V]
        flat = logits.view(-1, logits.shape[-1])
    except RuntimeError:                                # e.g. logits[:, :-1]: go batch by batch
        return torch.stack([_from_logits(x, t, ignore_index, temperature)
                            for x, t in zip(logits.unbind(0), targets.unbind(0))])
    return _from_logits(flat, targets.reshape(-1), ignore_index,
                        temperature).reshape(targets.shape)
