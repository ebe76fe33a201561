"""CTR metrics, defined once: evaluate.py, train_ctr.py and stage1_sft.py import these.

AUC (ROC, scikit-learn), LogLoss (probabilities clipped to [1e-7, 1 - 1e-7]) and gAUC (the DIN
paper's per-user AUC weighted by the user's number of samples, over users with both classes).
Every metric is NaN where it is undefined (one class only, no user with both classes), never
None, so that a caller tests one thing: math.isnan.
"""
from __future__ import annotations

import numpy as np
from sklearn.metrics import log_loss, roc_auc_score

P_CLIP = 1e-7  # probabilities are clipped to [P_CLIP, 1 - P_CLIP] before LogLoss


def auc(y, p) -> float:
    """ROC AUC; NaN when only one class is present."""
    y = np.asarray(y)
    return float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else float("nan")


def logloss(y, p) -> float:
    """Binary cross-entropy of click probabilities p; NaN for no samples."""
    if len(y) == 0:
        return float("nan")
    return float(log_loss(y, np.clip(np.asarray(p, float), P_CLIP, 1 - P_CLIP), labels=[0, 1]))


def gauc(y, p, uids) -> float:
    """Per-user AUC weighted by the user's number of samples, over users with both classes;
    NaN when no user has both. Vectorised: each user's AUC is the Mann-Whitney statistic of the
    tie-averaged ranks of p within that user (equal to roc_auc_score per user)."""
    y, p = np.asarray(y, np.float64), np.asarray(p, np.float64)
    _, g = np.unique(np.asarray(uids), return_inverse=True)
    if len(y) == 0:
        return float("nan")
    order = np.lexsort((p, g))
    gs, ps = g[order], p[order]
    n = len(y)
    start = np.r_[True, (gs[1:] != gs[:-1]) | (ps[1:] != ps[:-1])]  # runs of equal (user, p)
    run = np.cumsum(start) - 1
    first = np.flatnonzero(start)
    last = np.r_[first[1:], n] - 1
    user_first = np.flatnonzero(np.r_[True, gs[1:] != gs[:-1]])
    offset = np.repeat(user_first, np.diff(np.r_[user_first, n]))  # rank 1 = user's first row
    rank = (first[run] + last[run]) / 2.0 - offset + 1.0
    ys = y[order]
    cnt = np.bincount(gs).astype(np.float64)
    pos = np.bincount(gs, weights=ys)
    rank_pos = np.bincount(gs, weights=rank * ys)
    both = (pos > 0) & (pos < cnt)
    if not both.any():
        return float("nan")
    neg = cnt - pos
    a = (rank_pos[both] - pos[both] * (pos[both] + 1) / 2) / (pos[both] * neg[both])
    return float((cnt[both] * a).sum() / cnt[both].sum())


def ctr_metrics(y, p, uids) -> dict:
    """{auc, logloss, gauc, n} of one split's predictions."""
    return {"auc": auc(y, p), "logloss": logloss(y, p), "gauc": gauc(y, p, uids), "n": int(len(y))}


def percentile_ci(boot) -> list:
    """[2.5, 97.5] percentiles of the finite bootstrap values ([None, None] if there are none)."""
    b = np.asarray(boot, dtype=float)
    b = b[np.isfinite(b)]
    return [float(np.percentile(b, 2.5)), float(np.percentile(b, 97.5))] if len(b) else [None, None]
