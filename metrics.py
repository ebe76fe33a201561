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
    NaN when no user has both."""
    y, p, u = np.asarray(y), np.asarray(p), np.asarray(uids)
    order = np.argsort(u, kind="stable")
    _, starts = np.unique(u[order], return_index=True)
    num = den = 0.0
    for a, b in zip(starts, list(starts[1:]) + [len(u)]):
        idx = order[a:b]
        if 0 < y[idx].sum() < len(idx):
            num += len(idx) * roc_auc_score(y[idx], p[idx])
            den += len(idx)
    return float(num / den) if den else float("nan")


def ctr_metrics(y, p, uids) -> dict:
    """{auc, logloss, gauc, n} of one split's predictions."""
    return {"auc": auc(y, p), "logloss": logloss(y, p), "gauc": gauc(y, p, uids), "n": int(len(y))}


def percentile_ci(boot) -> list:
    """[2.5, 97.5] percentiles of the finite bootstrap values ([None, None] if there are none)."""
    b = np.asarray(boot, dtype=float)
    b = b[np.isfinite(b)]
    return [float(np.percentile(b, 2.5)), float(np.percentile(b, 97.5))] if len(b) else [None, None]
