"""Selected-token log-probs. PLACEHOLDER contract (issue 4 replaces this with the fused kernels).

selected_logprobs(hidden [N,H], weight [V,H], targets [N], *, bias=None, temperature=1.0,
                  ignore_index=-100, return_entropy=False) -> logp [N] (, entropy [N])
selected_logprobs_from_logits(logits [N,V], targets [N], ignore_index=-100) -> logp [N]
"""
import torch


def selected_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100,
                      return_entropy=False):
    logits = torch.nn.functional.linear(hidden, weight, bias).float() / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    logp = logp_all.gather(-1, safe[:, None]).squeeze(-1) * valid
    if return_entropy:
        ent = -(logp_all.exp() * logp_all).sum(-1) * valid
        return logp, ent
    return logp


def selected_logprobs_from_logits(logits, targets, ignore_index=-100):
    n = logits.shape[0]
    eye = torch.eye(logits.shape[-1], dtype=logits.dtype, device=logits.device)
    return selected_logprobs(logits, eye, targets, ignore_index=ignore_index)[:n]
