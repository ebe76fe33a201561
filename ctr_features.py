"""Inputs of the ID-based CTR models (train_ctr.py), built column-wise from SplitArrays.

The vocabulary comes from the train split only (index 0 = unknown / padding); the catalogue's
genres are content, known for every item. `Features(arrays, vocab).batch(idx)` gathers one
batch of model inputs from the split's columns - no per-row Python - so a 16M-sample split
trains from its memory-mapped columns without materialising its [n, K, G] history-genre tensor:
  uid, iid [B]   user / target item ids          tgen [B, G]     target genres
  hid, hlab [B, K]  history items, 0 pad / 1 disliked / 2 liked
  ugen [U, G]    genres of the batch's U distinct items (targets and history; one padding row)
  tpos [B], hpos [B, K]   rows of ugen: the target's genres are ugen[tpos], a history item's
                 ugen[hpos] (so a batch embeds U genre lists, not B x K)
  prof [B, F]    user-profile fields
  uitem [U]      item ids of the U distinct items (the rows of ugen)
  hsign [B, K, 2]  float one-hot of each history slot's label (disliked, liked; 0 0 on pads)
A split of JSONL dicts goes through SplitArrays.from_rows first (same inputs, same order).
The gathering is one numba kernel, parallel over the samples (tests/test_sample_store.py holds
its inputs equal to the per-row featurizer's, tests/test_ctr_ops.py its distinct items to
np.unique): at batch 4,096 on the 2M-rating benchmark data, 1.07 ms against 1.95 ms for the
numpy indexing it replaced (`scripts/bench_ctr_train.py --gather`, 2 threads).
"""
from __future__ import annotations

import ctr_ops  # noqa: F401  (first: it sizes numba's thread pool under torchrun before numba loads)
import numba
import numpy as np
import torch

from sample_store import SplitArrays


def as_arrays(samples) -> SplitArrays:
    return samples if isinstance(samples, SplitArrays) else SplitArrays.from_rows(list(samples))


def _index(values) -> dict:
    return {v: i + 1 for i, v in enumerate(sorted(set(values)))}


def field_strings(a: SplitArrays, name: str) -> np.ndarray:
    """Per row of the users table: the value of profile field `name` ('' where unknown)."""
    if name not in a.field_names:
        return np.full(len(a.users), "", dtype=object)
    codes = np.asarray(a.user_fields)[:, a.field_names.index(name)]
    table = np.array(list(a.field_values[name]) + [""], dtype=object)
    return table[np.where(codes >= 0, codes, len(table) - 1)]


def build_vocab(train: SplitArrays, items: dict[str, dict], user_fields: list[str]) -> dict:
    t_ucodes = np.unique(train.uid)  # the train users (codes into train.users)
    t_uid = train.users[t_ucodes].tolist()
    t_iid = train.items[np.unique(train.iid)].tolist()
    genres = _index(g for i in t_iid for g in items.get(i, {}).get("genres", []))
    item_genres = {iid: [genres[g] for g in it["genres"] if g in genres]
                   for iid, it in items.items()}
    field = {}
    for f in user_fields:
        vals = field_strings(train, f)
        field[f] = _index(vals[t_ucodes].tolist())
    return {"uid": _index(t_uid), "iid": _index(t_iid),
            "genre": genres, "item_genres": {k: v for k, v in item_genres.items() if v},
            "user_fields": list(user_fields), "field": field,
            "max_genres": max([len(v) for v in item_genres.values()] + [1]),
            "hist_len": int(max((train.hi - train.lo).max(initial=0), 1))}


class Features:
    """Model inputs of one split; .batch(idx) -> dict of int64 tensors."""

    def __init__(self, a: SplitArrays, vocab: dict):
        self.a, self.K, G = a, vocab["hist_len"], vocab["max_genres"]
        uv, iv, ig = vocab["uid"], vocab["iid"], vocab["item_genres"]
        ulut = np.array([uv.get(u, 0) for u in a.users.tolist()] + [0], np.int64)
        self.ilut = np.array([iv.get(i, 0) for i in a.items.tolist()] + [0], np.int64)
        self.gtab = np.zeros((len(a.items) + 1, G), np.int64)  # last row: padding
        for r, i in enumerate(a.items.tolist()):
            g = ig.get(i, [])[:G]
            self.gtab[r, :len(g)] = g
        self.uid, self.iid = ulut[a.uid], self.ilut[a.iid]
        prof = [np.array([vocab["field"][f].get(v, 0) for v in field_strings(a, f).tolist()],
                         np.int64)[a.uid] for f in vocab["user_fields"]]
        self.prof = np.stack(prof, 1) if prof else np.zeros((len(a), 1), np.int64)
        self.labels = np.asarray(a.label, np.float32)

    def __len__(self):
        return len(self.uid)

    def batch(self, idx) -> dict[str, torch.Tensor]:
        idx = np.ascontiguousarray(idx, dtype=np.int64)
        a = self.a
        ctr_ops._threads()
        cols = _batch_columns(idx, a.lo, a.hi, np.asarray(a.hist_iid), np.asarray(a.hist_label),
                              np.asarray(a.iid), self.uid, self.iid, self.prof, self.gtab, self.ilut,
                              self.K)
        names = ("uid", "iid", "tgen", "hid", "hlab", "ugen", "tpos", "hpos", "prof", "uitem", "hsign")
        return {k: torch.from_numpy(v) for k, v in zip(names, cols)}


@numba.njit(parallel=True, cache=True)
def _batch_columns(idx, lo, hi, hist_iid, hist_label, tcode, uid, iid, prof, gtab, ilut, K):
    """Features.batch's columns for the samples idx: the last K history items of each (item codes
    into the split's table, pad = its last row), their labels and signs, and the batch's distinct
    items (targets and history, in code order, as np.unique) with each slot's row among them."""
    B, G, pad = idx.shape[0], gtab.shape[1], gtab.shape[0] - 1
    tic, hic = np.empty(B, np.int64), np.empty((B, K), np.int64)
    u_, i_, pr = np.empty(B, np.int64), np.empty(B, np.int64), np.empty((B, prof.shape[1]), np.int64)
    tgen, hid, hlab = np.empty((B, G), np.int64), np.empty((B, K), np.int64), np.zeros((B, K), np.int64)
    hsign = np.zeros((B, K, 2), np.float32)
    for s in numba.prange(B):
        j = idx[s]
        tic[s], u_[s], i_[s] = tcode[j], uid[j], iid[j]
        for f in range(prof.shape[1]):
            pr[s, f] = prof[j, f]
        for g in range(G):
            tgen[s, g] = gtab[tic[s], g]
        first = max(lo[j], hi[j] - K)
        for k in range(K):
            c = first + k
            if c < hi[j]:
                liked = hist_label[c] == 1
                hic[s, k] = hist_iid[c]
                hlab[s, k] = 2 if liked else 1
                hsign[s, k, 1 if liked else 0] = 1.0
            else:
                hic[s, k] = pad
            hid[s, k] = ilut[hic[s, k]]
    seen = np.zeros(pad + 1, np.bool_)  # the distinct codes, numbered in code order (np.unique)
    for s in range(B):
        seen[tic[s]] = True
        for k in range(K):
            seen[hic[s, k]] = True
    rank, U = np.empty(pad + 1, np.int64), 0
    for c in range(pad + 1):
        rank[c] = U
        U += seen[c]
    uniq = np.empty(U, np.int64)
    for c in range(pad + 1):
        if seen[c]:
            uniq[rank[c]] = c
    ugen, uitem = np.empty((U, G), np.int64), np.empty(U, np.int64)
    for u in numba.prange(U):
        uitem[u] = ilut[uniq[u]]
        for g in range(G):
            ugen[u, g] = gtab[uniq[u], g]
    tpos, hpos = np.empty(B, np.int64), np.empty((B, K), np.int64)
    for s in numba.prange(B):
        tpos[s] = rank[tic[s]]
        for k in range(K):
            hpos[s, k] = rank[hic[s, k]]
    return u_, i_, tgen, hid, hlab, ugen, tpos, hpos, pr, uitem, hsign


def onehot(a: SplitArrays, vocab: dict):
    """Sparse one-hot [user | item | genres] for logreg; unknown ids -> column 0 of each block."""
    import scipy.sparse as sp
    f = Features(a, vocab) if not isinstance(a, Features) else a
    nu, ni = len(vocab["uid"]) + 1, len(vocab["iid"]) + 1
    g = f.gtab[f.a.iid]
    cols = np.concatenate([f.uid[:, None], nu + f.iid[:, None], np.where(g > 0, nu + ni + g, -1)], 1)
    rows = np.repeat(np.arange(len(f)), cols.shape[1]).reshape(cols.shape)
    keep = cols >= 0
    return sp.csr_matrix((np.ones(int(keep.sum())), (rows[keep], cols[keep])),
                         shape=(len(f), nu + ni + len(vocab["genre"]) + 1))


def item_click_rates(train, smoothing: float) -> tuple[dict, float]:
    """The popularity baseline, defined once (evaluate.py's fallback row uses it too): each
    item's training click rate (pos + a * global) / (count + a) with a = smoothing; items not in
    train get the global rate. Returns ({iid: rate}, global rate)."""
    a = as_arrays(train)
    y = np.asarray(a.label, np.float64)
    prior = float(np.mean(y))
    pos = np.bincount(a.iid, weights=y, minlength=len(a.items))
    cnt = np.bincount(a.iid, minlength=len(a.items)).astype(np.float64)
    return {str(a.items[c]): float((pos[c] + smoothing * prior) / (cnt[c] + smoothing))
            for c in np.flatnonzero(cnt).tolist()}, prior
