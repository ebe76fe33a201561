"""Data layer of ExpCTR: raw ratings -> CTR samples with the user's recent history.

Paper part: the input side of every stage (PAPER_NOTES.md §1, §7). Each interaction becomes one
CTR sample {uid, iid, label, ts, hist, [rating], [user], [cause]} whose `hist` is the user's last K
interactions strictly before it, so the explainer prompt (liked / disliked / target) and the
ID-CTR models see the same information and nothing from the target's time or later.

Reads   MovieLens-100K from the RecBole wheel (default, fetched once into ~/.cache/expctr), or the
        official raw files in --raw-dir: ML-1M (ratings.dat, movies.dat, users.dat), ML-20M
        (ratings.csv, movies.csv), BookCrossing (BX-Book-Ratings.csv, BX-Books.csv,
        [BX-Users.csv]), Amazon Books (reviews_Books*.json / Books*.json, meta_Books.json);
        or builds a seeded synthetic "planted world" (--dataset synthetic).
Writes  runs/X/data/{train,valid,test,rl,probe}.jsonl, items.jsonl, meta.json (schemas: common.py);
        a split of more than --jsonl-max-rows samples goes to the columnar store data/store/
        instead (sample_store.py; ML-20M-sized data), never to both. Built in a temp folder
        inside runs/X and renamed at the end; appends to runs/X/metrics.jsonl.
Cost    column-wise (numpy; ML-20M's ratings.csv parsed by pyarrow): 20M ratings in about a
        minute and under 3 GB on 2 cores (README, "Datasets at full size").

    python data_prep.py --run-dir runs/ml100k --dataset ml-100k
    python data_prep.py --run-dir runs/ml1m --dataset ml-1m --raw-dir ~/data/ml-1m
    python data_prep.py --run-dir runs/syn --dataset synthetic --n-users 500 --n-items 300
"""
from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

import common
import readers
import sample_store
from common import ADJ, GENRES, NOUN, ExpCTRError, RunPaths

DATASETS = ("ml-100k", "ml-1m", "ml-20m", "bookcrossing", "amazon-books", "synthetic")
# [ours] default label rules, PAPER_NOTES §7 (MovieLens >= 4, BookCrossing >= 5 of 10, Amazon >= 4)
DEFAULT_THRESHOLD = {"ml-100k": 4.0, "ml-1m": 4.0, "ml-20m": 4.0, "bookcrossing": 5.0,
                     "amazon-books": 4.0, "synthetic": None}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", required=True, help="run folder; data goes to <run-dir>/data/")
    p.add_argument("--dataset", default="ml-100k", choices=DATASETS, help="which dataset to build")
    p.add_argument("--raw-dir", default=None, help="folder with the official raw files "
                   "(required for ml-1m, ml-20m, bookcrossing, amazon-books)")
    p.add_argument("--history-len", type=int, default=10, help="K: history items per sample")
    p.add_argument("--min-history", type=int, default=1,
                   help="drop samples with fewer history items than this")
    p.add_argument("--label-threshold", type=float, default=None,
                   help="label = rating >= this (default: 4 MovieLens/Amazon, 5 BookCrossing)")
    p.add_argument("--split-frac", default="0.8,0.1,0.1",
                   help="train,valid,test fractions of samples, cut at time quantiles")
    p.add_argument("--max-samples", action="append", default=[], metavar="SPLIT=N",
                   help="keep a seeded random subset of N samples of SPLIT (train, valid, test, "
                   "rl, probe; repeatable)")
    p.add_argument("--rl-frac", type=float, default=0.1, help="share of the training period set "
                   "aside as RL prompts (data/rl.jsonl), never trained on by a reward model [ours]")
    p.add_argument("--probe-frac", type=float, default=0.02, help="share of the training period set "
                   "aside as reward-probe prompts (data/probe.jsonl), never trained on [ours]")
    p.add_argument("--prompt-style", choices=common.PROMPT_STYLES, default="items",
                   help="how LLM prompts show the history: items (title; year; genres, the paper's) "
                        "or genres (liked/disliked genre counts, ~2x shorter) [ours]")
    p.add_argument("--question", choices=tuple(common.QUESTIONS), default="paper",
                   help="the explainer's question, last line of its prompt (common.QUESTIONS): "
                        "paper, or genres (asks for a verdict from the liked/disliked genres) [ours]")
    p.add_argument("--jsonl-max-rows", type=int, default=500_000,
                   help="a split with more samples is written to the columnar store data/store/ "
                        "instead of data/<split>.jsonl (sample_store.py; each split is in exactly one; "
                        "0: every split)")
    p.add_argument("--seed", type=int, default=0, help="seed for subsets and synthetic data")
    p.add_argument("--force", action="store_true", help="rebuild even if data/ exists")
    g = p.add_argument_group("synthetic planted world")
    g.add_argument("--n-users", type=int, default=300, help="synthetic: number of users")
    g.add_argument("--n-items", type=int, default=200, help="synthetic: number of items")
    g.add_argument("--n-interactions", type=int, default=40000,
                   help="synthetic: total interactions (before the min-history filter)")
    g.add_argument("--taste-scale", type=float, default=3.0,
                   help="synthetic: size of a user's strong genre tastes (logit units)")
    g.add_argument("--exposure-bias", type=float, default=0.0,
                   help="synthetic: how much users favour items of genres they feel strongly about")
    g.add_argument("--mild-taste", type=float, default=1.0,
                   help="synthetic: std of a persona's mild tastes on the other genres")
    g.add_argument("--n-personas", type=int, default=8,
                   help="synthetic: number of taste personas users are drawn from")
    g.add_argument("--n-genres", type=int, default=len(GENRES),
                   help=f"synthetic: genres in the world (the first N of {len(GENRES)}; fewer = "
                   "more history items share the target's genres)")
    g.add_argument("--no-item-years", dest="item_years", action="store_false",
                   help="synthetic: leave release years out of the catalogue (they carry no signal "
                   "in this world; ~40 fewer prompt tokens)")
    return p.parse_args(argv)


# ---- algorithm: the synthetic planted world ------------------------------------------------
SYNTH_BIAS = -0.3  # [ours] the planted click model's intercept (logit units)


def make_synthetic(args):
    """Items with titles and 1-2 genres, users with hidden genre tastes, clicks drawn from a
    known logistic model: logit = bias + sum_{g in item} taste[u, g] + quality[i].
    `cause` = the item genre with the largest |taste| contribution. Returns (interactions, items,
    users, truth: (uid, iid) -> (label, cause, click probability, {genre: taste contribution})).
    [ours] everything here."""
    rng = np.random.default_rng(args.seed)
    G, U, I = args.n_genres, args.n_users, args.n_items
    if not 4 <= G <= len(GENRES):
        raise ExpCTRError(f"--n-genres {G}: expected 4..{len(GENRES)} (a persona has 4 strong tastes)")
    items, titles = {}, set()
    quality = rng.normal(0, 0.5, I)
    item_g = []
    for i in range(I):
        base = f"The {ADJ[rng.integers(len(ADJ))]} {NOUN[rng.integers(len(NOUN))]}"
        title, k = base, 2
        while title in titles:
            title, k = f"{base} {k}", k + 1
        titles.add(title)
        gs = sorted(rng.choice(G, size=1 + int(rng.random() < 0.5), replace=False).tolist())
        item_g.append(gs)
        items[str(i + 1)] = {"iid": str(i + 1), "title": title,
                             "genres": [GENRES[g] for g in gs], "year": str(rng.integers(1960, 2021))}
        if not args.item_years:
            del items[str(i + 1)]["year"]
    # [ours] tastes are low-rank: each user follows one of a few personas (4 strong likes or
    # dislikes each, on top of mild tastes) plus a personal deviation, so that the planted
    # signal can be learned from tens of interactions per user.
    persona = rng.normal(0, args.mild_taste, (args.n_personas, G))
    for k in range(args.n_personas):
        strong = rng.choice(G, 4, replace=False)
        persona[k, strong] = rng.choice([-1, 1], 4) * args.taste_scale * rng.uniform(0.7, 1.3, 4)
    user_persona = rng.integers(args.n_personas, size=U)
    taste = persona[user_persona] + rng.normal(0, 0.3, (U, G))
    users = {str(u + 1): {"age": ["18-24", "25-34", "35-44", "45-49"][rng.integers(4)],
                          "gender": "MF"[rng.integers(2)]} for u in range(U)}
    pop = 1.0 / np.arange(1, I + 1) ** 0.6  # Zipf-like exposure
    pop = rng.permutation(pop / pop.sum())
    activity = rng.lognormal(0, 0.6, U)
    n_per = np.maximum(2, np.round(activity / activity.sum() * args.n_interactions)).astype(int)
    n_per = np.minimum(n_per, I)
    inter, truth = [], {}
    t0, span = 1_000_000_000, 365 * 86400
    for u in range(U):
        # [ours] users see more of the genres they feel strongly about (either way)
        w = pop * np.exp(args.exposure_bias * np.array([np.abs(taste[u, g]).max() for g in item_g]))
        iids = rng.choice(I, n_per[u], replace=False, p=w / w.sum())
        ts = np.sort(rng.integers(t0, t0 + span, n_per[u]))
        for i, t in zip(iids, ts):
            contrib = taste[u, item_g[i]]
            logit = SYNTH_BIAS + contrib.sum() + quality[i]
            label = int(rng.random() < 1 / (1 + math.exp(-logit)))
            cause = GENRES[item_g[i][int(np.argmax(np.abs(contrib)))]]
            inter.append((str(u + 1), str(i + 1), int(t), None))
            truth[(str(u + 1), str(i + 1))] = (label, cause, 1 / (1 + math.exp(-logit)),
                                               dict(zip((GENRES[g] for g in item_g[i]), contrib.tolist())))
    return inter, items, users, truth


# ---- algorithm: interactions -> samples with strictly-earlier history, temporal split -------
class Samples:
    """Every interaction is a sample whose history is the same user's last K interactions
    strictly before its timestamp (ties share a timestamp group and never see each other).
    Vectorised: `order` is the global time order (ts, then uid, iid as strings, then file order),
    `seq` the same interactions grouped by user (time order inside a user), and the history of
    the interaction at seq position p is seq[lo[p]:hi[p]]. Built from arrays once; `row(k)`
    makes the JSON dict of interaction k only when a JSONL split is written."""

    def __init__(self, inter: readers.Interactions, labels, users, extras, K, min_hist):
        self.inter, self.labels, self.users, self.extras = inter, np.asarray(labels), users, extras
        # string ranks make the integer sort keys order exactly like the strings do; int32
        # positions and early deletes keep ML-20M's 20M interactions within a few GB
        urank = np.argsort(np.argsort(inter.users, kind="stable"), kind="stable").astype(np.int32)
        irank = np.argsort(np.argsort(inter.items, kind="stable"), kind="stable").astype(np.int32)
        urank, irank = urank[inter.uid], irank[inter.iid]
        order = np.lexsort((irank, urank, inter.ts))  # stable: file order breaks full ties
        del irank
        seq = order[np.argsort(urank[order], kind="stable")]
        n = len(seq)
        j = np.arange(n, dtype=np.int64)
        u = urank[seq]
        del urank
        new_user = np.ones(n, bool)
        new_user[1:] = u[1:] != u[:-1]
        del u
        t = inter.ts[seq]
        new_group = new_user.copy()
        new_group[1:] |= t[1:] != t[:-1]
        del t
        self.lo = np.maximum.accumulate(np.where(new_user, j, 0))  # the user's first position
        self.hi = np.maximum.accumulate(np.where(new_group, j, 0))  # first of the ts group
        del new_user, new_group
        np.maximum(self.lo, self.hi - K, out=self.lo)  # history = seq[lo:hi], by seq position
        self.seq = seq
        self.pos = np.empty(n, np.int64)  # inter index -> seq position
        self.pos[seq] = j
        del j
        keep = (self.hi - self.lo)[self.pos[order]] >= min_hist
        self.order = order[keep]

    def hist(self, k):
        p = self.pos[k]
        return self.seq[self.lo[p]:self.hi[p]]

    def row(self, k) -> dict:
        inter, k = self.inter, int(k)
        uid, iid = str(inter.users[inter.uid[k]]), str(inter.items[inter.iid[k]])
        s = {"uid": uid, "iid": iid, "label": int(self.labels[k]), "ts": int(inter.ts[k]),
             "hist": [[str(inter.items[inter.iid[h]]), int(self.labels[h])] for h in self.hist(k)]}
        if not np.isnan(inter.rating[k]):
            s["rating"] = float(inter.rating[k])
        if uid in self.users:
            s["user"] = self.users[uid]
        for name, (codes, table) in self.extras.items():
            s[name] = table[codes[k]]
        return s

    def write_store(self, folder: Path, splits: dict, history_len: int):
        """The splits given, into the columnar store (sample_store.py)."""
        inter, seq = self.inter, self.seq
        names = list(next(iter(self.users.values()), {}))
        values = {f: sorted({str(u[f]) for u in self.users.values()}) for f in names}
        vcode = {f: {v: c for c, v in enumerate(vs)} for f, vs in values.items()}
        uf = np.full((len(inter.users), len(names)), -1, np.int32)
        for c, uid in enumerate(inter.users.tolist()):
            if uid in self.users:
                uf[c] = [vcode[f][str(self.users[uid][f])] for f in names]
        idx = np.int32 if len(seq) < 2 ** 31 else np.int64
        has_rating = not np.isnan(inter.rating).all()

        def columns():  # one at a time, so that each is freed once saved
            yield "users", inter.users
            yield "items", inter.items
            yield "user_fields", uf
            yield "seq_uid", inter.uid[seq]
            yield "seq_iid", inter.iid[seq]
            yield "seq_label", self.labels[seq].astype(np.int8)
            yield "seq_ts", inter.ts[seq]
            yield "seq_lo", self.lo.astype(idx)
            yield "seq_hi", self.hi.astype(idx)
            if has_rating:
                yield "seq_rating", inter.rating[seq]
            for k, (codes, _) in self.extras.items():
                yield f"seq_{k}", np.asarray(codes)[seq].astype(np.int16)
            for k, v in splits.items():
                yield k, self.pos[v].astype(idx)
        sample_store.write_store(folder, columns(), {
            "n_interactions": len(seq), "history_len": history_len,
            "counts": {k: len(v) for k, v in splits.items()}, "has_rating": has_rating,
            "user_fields": names, "field_values": values,
            "extras": {k: list(t) for k, (_, t) in self.extras.items()}})


def temporal_split(order, ts, fracs):
    """Cut the time-ordered samples at time quantiles; samples sharing a timestamp stay together
    (a split starts at the first sample whose ts >= the boundary)."""
    n = len(order)
    t = ts[order]
    b1 = int(t[min(n - 1, int(n * fracs[0]))])
    b2 = int(t[min(n - 1, int(n * (fracs[0] + fracs[1])))])
    out = {"train": order[t < b1], "valid": order[(t >= b1) & (t < b2)], "test": order[t >= b2]}
    return out, {"valid_start_ts": b1, "test_start_ts": b2}


PARTITION_STREAM = 99  # rng stream of the partition, apart from the subset streams (split index)


def carve_prompt_splits(train: list, rl_frac: float, probe_frac: float, seed: int) -> dict:
    """[ours] PAPER_NOTES §4: a seeded partition of the training period into `train` (what the
    reward models and ID models train on), `rl` (PPO prompts) and `probe` (the fixed held-out
    reward probe). It depends only on the full train split and the seed, never on --max-samples,
    so a subset run and a full-data run of the same data agree on it (the quick preset's ID
    models, trained on full data, never see its RL or probe prompts). Time order is kept."""
    rng = np.random.default_rng([seed, PARTITION_STREAM])
    perm = rng.permutation(len(train))
    n_probe, n_rl = int(round(probe_frac * len(train))), int(round(rl_frac * len(train)))
    role = np.zeros(len(train), np.int8)  # 0 train, 1 rl, 2 probe
    role[perm[:n_probe]] = 2
    role[perm[n_probe:n_probe + n_rl]] = 1
    return {name: np.asarray(train)[role == code] for code, name in enumerate(("train", "rl", "probe"))}


def subsample(rows, n, seed, split):
    """Seeded subset of one split, file order (time order) kept."""
    if n >= len(rows):
        return rows
    rng = np.random.default_rng([seed, common.ALL_SPLITS.index(split)])
    idx = np.sort(rng.choice(len(rows), n, replace=False))
    return rows[idx]


# ---- plumbing: main --------------------------------------------------------------------
def canonical_args(args) -> dict:
    d = {k: v for k, v in vars(args).items() if k not in ("force", "run_dir", "jsonl_max_rows")}
    if args.dataset != "synthetic":
        for k in ("n_users", "n_items", "n_interactions", "taste_scale", "n_personas",
                  "exposure_bias", "mild_taste", "n_genres", "item_years"):
            d.pop(k)
    if d.get("question") == "paper":  # the default; runs made before --question stay valid
        d.pop("question")
    return d


def main(argv=None):
    args = parse_args(argv)
    paths = RunPaths(args.run_dir)
    want = canonical_args(args)
    if paths.meta.exists() and not args.force:
        if common.read_json(paths.meta).get("args") == want:
            print(f"skip: {paths.meta} exists with the same arguments")
            return
        raise ExpCTRError(f"{paths.meta} exists with different arguments: "
                          "use --force to rebuild or choose another --run-dir")
    try:
        fracs = [float(x) for x in args.split_frac.split(",")]
        assert len(fracs) == 3 and all(f >= 0 for f in fracs) and abs(sum(fracs) - 1) < 1e-6
    except (ValueError, AssertionError):
        raise ExpCTRError(f"--split-frac {args.split_frac!r}: expected 3 fractions summing to 1")
    if not (0 <= args.rl_frac and 0 <= args.probe_frac and args.rl_frac + args.probe_frac < 1):
        raise ExpCTRError(f"--rl-frac {args.rl_frac} --probe-frac {args.probe_frac}: expected "
                          "non-negative shares of the training period summing to less than 1")
    max_samples = {}
    for spec in args.max_samples:
        split, _, n = spec.partition("=")
        if split not in common.ALL_SPLITS or not n.isdigit():
            raise ExpCTRError(f"--max-samples {spec!r}: expected SPLIT=N with SPLIT in "
                              f"{'/'.join(common.ALL_SPLITS)}")
        max_samples[split] = int(n)

    extras, dropped = {}, 0
    if args.dataset == "synthetic":
        rows, items, users, truth = make_synthetic(args)
        inter = readers.Interactions.from_tuples(rows)
        labels = np.array([truth[r[:2]][0] for r in rows], np.int8)
        extras = {"cause": (np.array([GENRES.index(truth[r[:2]][1]) for r in rows]), GENRES)}
        sources, main_file = [], "synthetic"
        label_rule = (f"click ~ Bernoulli(sigmoid({SYNTH_BIAS} + sum of user taste over item genres "
                      f"+ quality))")
    else:
        inter, items, users, sources = readers.LOADERS[args.dataset](args)
        main_file = str(sources[0])
        n0 = len(inter)
        known = np.array([i in items for i in inter.items.tolist()], bool)
        inter = inter.take(known[inter.iid])  # [ours] drop ratings of uncatalogued items
        dropped = n0 - len(inter)
        thr = args.label_threshold if args.label_threshold is not None \
            else DEFAULT_THRESHOLD[args.dataset]
        labels = (inter.rating >= thr).astype(np.int8)
        label_rule = f"label = rating >= {thr:g}"
    if not len(inter):
        raise ExpCTRError(f"{main_file}: no interactions left (expected ratings of catalogued items)")
    samples = Samples(inter, labels, users, extras, args.history_len, args.min_history)
    if not len(samples.order):
        raise ExpCTRError(f"{main_file}: no samples left with >= {args.min_history} history items")
    splits, bounds = temporal_split(samples.order, inter.ts, fracs)
    splits.update(carve_prompt_splits(splits["train"], args.rl_frac, args.probe_frac, args.seed))
    for split, n in max_samples.items():
        splits[split] = subsample(splits[split], n, args.seed, split)
    for split, ks in splits.items():
        if not len(ks) and split in common.SPLITS:  # rl / probe may be empty (--rl-frac 0)
            raise ExpCTRError(f"{main_file}: the {split} split is empty "
                              f"({len(samples.order)} samples, --split-frac {args.split_frac})")

    kept = np.concatenate(list(splits.values()))
    # items used by a kept sample or its history: mark the covered seq ranges [lo, hi)
    p = samples.pos[kept]
    n1 = len(inter) + 1
    cover = np.bincount(samples.lo[p], minlength=n1)
    cover -= np.bincount(samples.hi[p], minlength=n1)
    del p
    in_hist = np.cumsum(cover[:-1]) > 0
    del cover
    mark = np.zeros(len(inter.items), bool)
    mark[inter.iid[kept]] = True
    mark[inter.iid[samples.seq[in_hist]]] = True
    del in_hist
    used = inter.items[np.flatnonzero(mark)].tolist()
    item_rows = [items[i] for i in sorted(used, key=lambda x: (len(x), x))]
    meta = {
        "dataset": args.dataset,
        "sources": [{"path": str(p), "sha256": readers.sha256(Path(p)), "bytes": Path(p).stat().st_size}
                    for p in sources],
        "counts": {k: len(v) for k, v in splits.items()},
        "pos_rate": {s: round(float(labels[ks].mean()), 6) if len(ks) else None
                     for s, ks in splits.items()},
        "prompt_partition": {"rl_frac": args.rl_frac, "probe_frac": args.probe_frac, "seed": args.seed,
                             "rule": "seeded permutation of the full train split (before any "
                                     "--max-samples subset): rl and probe samples are removed from "
                                     "train.jsonl, so no reward model or ID model trains on them"},
        "label_rule": label_rule,
        "split_boundaries": bounds,
        "vocab": {"users": int((np.bincount(inter.uid[kept], minlength=1) > 0).sum()),
                  "items": len(item_rows),
                  "genres": len({g for it in item_rows for g in it["genres"]})},
        "user_fields": sorted({f for u in users.values() for f in u}),
        "n_interactions": len(inter), "n_dropped_uncatalogued": dropped,
        "n_samples_before_subset": len(samples.order),
        "args": want,
    }
    # one copy of every split: JSONL when small (LLM stages, people), else the columnar store
    big = {k: v for k, v in splits.items() if len(v) > args.jsonl_max_rows or not args.jsonl_max_rows}
    meta["storage"] = {k: "store" if k in big else "jsonl" for k in splits}
    if args.dataset == "synthetic":
        # the Bayes-optimal AUC on test (true click probabilities) is the ceiling for any model
        from sklearn.metrics import roc_auc_score
        test = [(str(inter.users[inter.uid[k]]), str(inter.items[inter.iid[k]]))
                for k in splits["test"]]
        meta["oracle_test_auc"] = round(float(roc_auc_score(
            [truth[x][0] for x in test], [truth[x][2] for x in test])), 4)

    # ---- plumbing: write everything in a temp folder inside the run dir, rename at the end
    created = not paths.root.exists()
    try:
        with common.atomic_path(paths.data) as tmp:
            tmp.mkdir()
            for split, ks in splits.items():
                if split not in big:
                    common.write_jsonl(tmp / f"{split}.jsonl", (samples.row(k) for k in tqdm(
                        ks, desc=f"{split}.jsonl", unit=" rows", mininterval=2, disable=None)))
            if big:
                samples.write_store(tmp / "store", big, args.history_len)
            common.write_jsonl(tmp / "items.jsonl", item_rows)
            common.write_json(tmp / "meta.json", meta)
    except BaseException:
        if created:
            shutil.rmtree(paths.root, ignore_errors=True)
        raise
    common.log_metrics(paths.metrics, stage="data_prep", dataset=args.dataset, **meta["counts"],
                       **{f"pos_rate_{k}": v for k, v in meta["pos_rate"].items()})
    print(f"[data_prep] {args.dataset}: " + ", ".join(
        f"{k} {meta['counts'][k]} (pos {meta['pos_rate'][k] or 0:.3f})" for k in common.ALL_SPLITS) +
        f"; {meta['vocab']['users']} users, {meta['vocab']['items']} items -> {paths.data}")
    if "oracle_test_auc" in meta:
        print(f"[data_prep] synthetic oracle test AUC {meta['oracle_test_auc']}")


if __name__ == "__main__":
    common.cli(main)
