"""The columnar sample store: CTR samples of large splits as memory-mapped .npy columns.

Why: a 16M-sample train split as JSONL is gigabytes of text that every reader parses row by
row, and its histories repeat each interaction up to K times. The store keeps every
interaction once, in user-sequence order (by user, then time), and a sample is a position in that
table whose history is the slice seq[lo:hi] of the same user's earlier interactions - exactly
data_prep.py's rule, stored as two pointers instead of K copies. Columns are plain .npy files
(np.load(mmap_mode="r"): no decoding, random access for shuffled batches, no extra dependency);
we chose them over Parquet because train_ctr.py gathers random batches, which a memory map
serves directly and a compressed row-group format does not.

One source of truth: data_prep.py writes each split EITHER as data/<split>.jsonl (splits of at
most --jsonl-max-rows samples: what the LLM stages and a person read) OR into this store (larger
splits), never both, so no two copies can drift. common.load_split reads either;
train_ctr.py reads either as SplitArrays (columns) and trains from them in batches.

Layout of data/store/ (written inside data_prep.py's atomic data folder):
  store.json              format, counts, user-field value tables, extra-column tables
  users.npy, items.npy    string tables (raw uid / iid), indexed by the codes below
  seq_uid, seq_iid        int32 codes, one row per interaction in user-sequence order
  seq_label (int8), seq_ts (int64), [seq_rating (float64)], [seq_<extra> (int16 codes)]
  seq_lo, seq_hi          history of the interaction at position p = positions lo[p]..hi[p]-1
  user_fields (int32 [users, F], -1 = no profile), <split>.npy   positions of a split's samples

    python sample_store.py runs/ml20m/data train --head 3     # print samples as JSONL
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from common import ExpCTRError

FORMAT = "expctr-sample-store/1"


class SplitArrays:
    """One split as columns: the samples' uid/iid codes, label, ts, and their histories as
    slices [lo, hi) of the flat arrays hist_iid / hist_label (codes into the same item table)."""

    def __init__(self, uid, iid, label, ts, lo, hi, hist_iid, hist_label, users, items,
                 user_fields=None, field_names=(), field_values=None):
        self.uid, self.iid = np.asarray(uid), np.asarray(iid)
        self.label, self.ts = np.asarray(label), np.asarray(ts)
        self.lo, self.hi = np.asarray(lo, np.int64), np.asarray(hi, np.int64)
        self.hist_iid, self.hist_label = hist_iid, hist_label
        self.users, self.items = users, items
        self.field_names = list(field_names)
        self.user_fields = user_fields if user_fields is not None else \
            np.full((len(users), len(self.field_names)), -1, np.int32)
        self.field_values = field_values or {f: [] for f in self.field_names}

    def __len__(self):
        return len(self.label)

    @classmethod
    def from_rows(cls, rows: list[dict]) -> "SplitArrays":
        """From JSONL sample dicts (the small splits, test fixtures, the IC reward's samples)."""
        users = sorted({s["uid"] for s in rows})
        items = sorted({s["iid"] for s in rows} | {h[0] for s in rows for h in s["hist"]})
        ucode = {u: k for k, u in enumerate(users)}
        icode = {i: k for k, i in enumerate(items)}
        lens = np.array([len(s["hist"]) for s in rows], np.int64)
        hi = np.cumsum(lens)
        fields = sorted({f for s in rows for f in s.get("user", {})})
        values = {f: sorted({str(s["user"][f]) for s in rows if f in s.get("user", {})})
                  for f in fields}
        vcode = {f: {v: k for k, v in enumerate(vs)} for f, vs in values.items()}
        uf = np.full((len(users), len(fields)), -1, np.int32)
        for s in rows:
            for j, f in enumerate(fields):
                if f in s.get("user", {}):
                    uf[ucode[s["uid"]], j] = vcode[f][str(s["user"][f])]
        return cls(np.array([ucode[s["uid"]] for s in rows], np.int64),
                   np.array([icode[s["iid"]] for s in rows], np.int64),
                   np.array([s["label"] for s in rows], np.int8),
                   np.array([s["ts"] for s in rows], np.int64), hi - lens, hi,
                   np.array([icode[h[0]] for s in rows for h in s["hist"]], np.int64),
                   np.array([h[1] for s in rows for h in s["hist"]], np.int8),
                   np.array(users, dtype=str), np.array(items, dtype=str), uf, fields, values)


class SampleStore:
    """A store folder opened read-only (columns memory-mapped)."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.info = json.loads((self.folder / "store.json").read_text(encoding="utf-8"))
        if self.info.get("format") != FORMAT:
            raise ExpCTRError(f"{self.folder / 'store.json'}: field 'format' should be "
                              f"{FORMAT!r}, got {self.info.get('format')!r}")

    def col(self, name: str) -> np.ndarray:
        # a plain ndarray over the memory map (np.memmap's subclass overhead costs per batch)
        return np.asarray(np.load(self.folder / f"{name}.npy", mmap_mode="r"))

    @property
    def splits(self) -> list[str]:
        return list(self.info["counts"])

    def arrays(self, split: str) -> SplitArrays:
        pos = self.col(split)
        return SplitArrays(self.col("seq_uid")[pos], self.col("seq_iid")[pos],
                           self.col("seq_label")[pos], self.col("seq_ts")[pos],
                           self.col("seq_lo")[pos], self.col("seq_hi")[pos],
                           self.col("seq_iid"), self.col("seq_label"),
                           self.col("users"), self.col("items"), self.col("user_fields"),
                           self.info["user_fields"], self.info["field_values"])

    def rows(self, split: str, limit: int | None = None) -> list[dict]:
        """The split's samples as the dicts data/<split>.jsonl would hold (same keys, order)."""
        pos = self.col(split)[:limit]
        c = {k: self.col(k) for k in ("seq_uid", "seq_iid", "seq_label", "seq_ts", "seq_lo",
                                      "seq_hi")}
        users, items, uf = self.col("users"), self.col("items"), self.col("user_fields")
        rating = self.col("seq_rating") if self.info["has_rating"] else None
        extras = {k: (self.col(f"seq_{k}"), v) for k, v in self.info["extras"].items()}
        fnames, fvals = self.info["user_fields"], self.info["field_values"]
        out = []
        for p in pos.tolist():
            lo, hi, u = int(c["seq_lo"][p]), int(c["seq_hi"][p]), int(c["seq_uid"][p])
            s = {"uid": str(users[u]), "iid": str(items[c["seq_iid"][p]]),
                 "label": int(c["seq_label"][p]), "ts": int(c["seq_ts"][p]),
                 "hist": [[str(items[i]), int(y)] for i, y in
                          zip(c["seq_iid"][lo:hi].tolist(), c["seq_label"][lo:hi].tolist())]}
            if rating is not None:
                s["rating"] = float(rating[p])
            if len(fnames) and uf[u, 0] >= 0:
                s["user"] = {f: fvals[f][int(uf[u, j])] for j, f in enumerate(fnames)}
            for k, (codes, table) in extras.items():
                s[k] = table[int(codes[p])]
            out.append(s)
        return out


def write_store(folder: Path, columns, info: dict):
    """columns: (name, array) pairs, consumed one at a time (each array can be freed as soon as
    it is saved: ML-20M's columns are written without holding them all); info: store.json."""
    folder.mkdir(parents=True)
    for name, arr in columns:
        np.save(folder / f"{name}.npy", arr)
    (folder / "store.json").write_text(json.dumps(dict(info, format=FORMAT), indent=1),
                                       encoding="utf-8")


def main(argv=None):
    p = argparse.ArgumentParser(description="print samples of a store split as JSONL")
    p.add_argument("data_dir", help="a run's data folder (holds store/)")
    p.add_argument("split", help="train, valid, test, rl or probe")
    p.add_argument("--head", type=int, default=5, help="how many samples (0 = all)")
    a = p.parse_args(argv)
    folder = Path(a.data_dir) / "store"
    if not (folder / "store.json").exists():
        sys.exit(f"error: {folder / 'store.json'}: file not found (this run's splits are JSONL: "
                 f"read {Path(a.data_dir)}/{a.split}.jsonl)")
    st = SampleStore(folder)
    if a.split not in st.splits:
        sys.exit(f"error: {folder}: no split {a.split!r} in the store (it has "
                 f"{', '.join(st.splits)})")
    for row in st.rows(a.split, a.head or None):
        print(json.dumps(row, ensure_ascii=False))


if __name__ == "__main__":
    main()
