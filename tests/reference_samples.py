"""The per-row sample builder of data_prep.py before it was vectorised (commit a97192e), kept as
the reference the new path must match sample for sample (tests/test_sample_store.py)."""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

import common
import readers


def ml20m_tuples(path):
    """ratings.csv row by row, as the old loader read it."""
    return [(r["userId"], r["movieId"], readers.to_num(r["timestamp"], int, w, "timestamp"),
             readers.to_num(r["rating"], float, w, "rating"))
            for w, r in readers.read_csv(path, ["userId", "movieId", "rating", "timestamp"])]


def build(inter, labels, users, extras, K, min_hist, fracs, rl_frac, probe_frac, seed,
          max_samples) -> dict[str, list[dict]]:
    """inter: (uid, iid, ts, rating|None) tuples; labels: list; extras: {k: {name: value}}."""
    order = sorted(range(len(inter)), key=lambda k: (inter[k][2], inter[k][0], inter[k][1], k))
    by_user = defaultdict(list)
    for k in order:
        by_user[inter[k][0]].append(k)
    lo, hi = {}, {}
    for ks in by_user.values():
        start = 0
        for j, k in enumerate(ks):
            if j > 0 and inter[k][2] != inter[ks[j - 1]][2]:
                start = j
            lo[k], hi[k] = max(0, start - K), start
    order = [k for k in order if hi[k] - lo[k] >= min_hist]

    def row(k):
        uid, iid, ts, rating = inter[k]
        s = {"uid": uid, "iid": iid, "label": labels[k], "ts": ts,
             "hist": [[inter[h][1], labels[h]] for h in by_user[uid][lo[k]:hi[k]]]}
        if rating is not None:
            s["rating"] = rating
        if uid in users:
            s["user"] = users[uid]
        s.update(extras.get(k, {}))
        return s

    n = len(order)
    ts = np.array([inter[k][2] for k in order])
    b1 = int(ts[min(n - 1, int(n * fracs[0]))])
    b2 = int(ts[min(n - 1, int(n * (fracs[0] + fracs[1])))])
    out = {"train": [], "valid": [], "test": []}
    for k, t in zip(order, ts):
        out["train" if t < b1 else "valid" if t < b2 else "test"].append(k)
    train = out["train"]
    rng = np.random.default_rng([seed, 99])
    perm = rng.permutation(len(train))
    n_probe, n_rl = int(round(probe_frac * len(train))), int(round(rl_frac * len(train)))
    role = np.zeros(len(train), np.int8)
    role[perm[:n_probe]] = 2
    role[perm[n_probe:n_probe + n_rl]] = 1
    out.update({name: [k for k, r in zip(train, role) if r == code]
                for code, name in enumerate(("train", "rl", "probe"))})
    for split, m in max_samples.items():
        if m < len(out[split]):
            g = np.random.default_rng([seed, common.ALL_SPLITS.index(split)])
            out[split] = [out[split][i] for i in np.sort(g.choice(len(out[split]), m, replace=False))]
    return {s: [row(k) for k in ks] for s, ks in out.items()}


# ---- train_ctr.py's per-row features before they were vectorised (commit a97192e) ----
def build_vocab(train: list[dict], items: dict[str, dict], user_fields: list[str]) -> dict:
    def index(values):
        return {v: i + 1 for i, v in enumerate(sorted(set(values)))}
    genres = index(g for s in train for g in items.get(s["iid"], {}).get("genres", []))
    # genres are catalogue content (known for any item), so each catalogue item keeps its genres
    item_genres = {iid: [genres[g] for g in it["genres"] if g in genres]
                   for iid, it in items.items()}
    return {"uid": index(s["uid"] for s in train), "iid": index(s["iid"] for s in train),
            "genre": genres, "item_genres": {k: v for k, v in item_genres.items() if v},
            "user_fields": list(user_fields),
            "field": {f: index(str(s.get("user", {}).get(f, "")) for s in train)
                      for f in user_fields},
            "max_genres": max([len(v) for v in item_genres.values()] + [1]),
            "hist_len": max([len(s["hist"]) for s in train] + [1])}


def featurize(samples: list[dict], vocab: dict) -> dict[str, torch.Tensor]:
    """All model inputs as tensors, built once per split."""
    n, K, G = len(samples), vocab["hist_len"], vocab["max_genres"]
    uv, iv, ig = vocab["uid"], vocab["iid"], vocab["item_genres"]
    uid = np.zeros(n, np.int64)
    iid = np.zeros(n, np.int64)
    tgen = np.zeros((n, G), np.int64)
    hid = np.zeros((n, K), np.int64)
    hlab = np.zeros((n, K), np.int64)
    hgen = np.zeros((n, K, G), np.int64)
    prof = np.zeros((n, max(1, len(vocab["user_fields"]))), np.int64)
    for r, s in enumerate(samples):
        uid[r] = uv.get(s["uid"], 0)
        iid[r] = iv.get(s["iid"], 0)
        g = ig.get(s["iid"], [])[:G]
        tgen[r, :len(g)] = g
        hist = s["hist"][-K:]
        for j, (h, lab) in enumerate(hist):
            hid[r, j] = iv.get(h, 0)
            hlab[r, j] = 2 if lab == 1 else 1  # 0 pad, 1 disliked, 2 liked
            g = ig.get(h, [])[:G]
            hgen[r, j, :len(g)] = g
        user = s.get("user", {})
        for f, name in enumerate(vocab["user_fields"]):
            prof[r, f] = vocab["field"][name].get(str(user.get(name, "")), 0)
    return {k: torch.from_numpy(v) for k, v in dict(uid=uid, iid=iid, tgen=tgen, hid=hid,
            hlab=hlab, hgen=hgen, prof=prof).items()}
