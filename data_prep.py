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
Writes  runs/X/data/{train,valid,test}.jsonl, items.jsonl, meta.json (schemas: common.py), built
        in a temp folder inside runs/X and renamed at the end; appends to runs/X/metrics.jsonl.

    python data_prep.py --run-dir runs/ml100k --dataset ml-100k
    python data_prep.py --run-dir runs/ml1m --dataset ml-1m --raw-dir ~/data/ml-1m
    python data_prep.py --run-dir runs/syn --dataset synthetic --n-users 500 --n-items 300
"""
from __future__ import annotations

import argparse
import math
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

import common
import readers
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
    `cause` = the item genre with the largest |taste| contribution. [ours] everything here."""
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
            truth[(str(u + 1), str(i + 1))] = (label, cause, 1 / (1 + math.exp(-logit)))
    return inter, items, users, truth


# ---- algorithm: interactions -> samples with strictly-earlier history, temporal split -------
class Samples:
    """Samples kept as interaction indices (cheap for ML-20M-sized data); `row(k)` builds the
    JSON dict of interaction k only when it is written."""

    def __init__(self, inter, labels, users, extras, K, min_hist):
        # one sample per interaction, global time order (ties: uid, iid, then input order)
        order = sorted(range(len(inter)), key=lambda k: (inter[k][2], inter[k][0], inter[k][1], k))
        self.by_user = defaultdict(list)
        for k in order:
            self.by_user[inter[k][0]].append(k)
        self.lo = np.zeros(len(inter), np.int64)  # hist = by_user[uid][lo[k]:hi[k]]
        self.hi = np.zeros(len(inter), np.int64)
        for uid, ks in tqdm(self.by_user.items(), desc="history", unit=" users", mininterval=2,
                            disable=None):
            start = 0  # first position of the current timestamp group: history ends before it
            for j, k in enumerate(ks):
                if j > 0 and inter[k][2] != inter[ks[j - 1]][2]:
                    start = j
                self.lo[k], self.hi[k] = max(0, start - K), start
        self.order = [k for k in order if self.hi[k] - self.lo[k] >= min_hist]
        self.inter, self.labels, self.users, self.extras = inter, labels, users, extras

    def hist(self, k):
        return self.by_user[self.inter[k][0]][self.lo[k]:self.hi[k]]

    def row(self, k) -> dict:
        uid, iid, ts, rating = self.inter[k]
        s = {"uid": uid, "iid": iid, "label": self.labels[k], "ts": ts,
             "hist": [[self.inter[h][1], self.labels[h]] for h in self.hist(k)]}
        if rating is not None:
            s["rating"] = rating
        if uid in self.users:
            s["user"] = self.users[uid]
        s.update(self.extras.get(k, {}))
        return s


def temporal_split(order, ts_of, fracs):
    """Cut the time-ordered samples at time quantiles; samples sharing a timestamp stay together
    (a split starts at the first sample whose ts >= the boundary)."""
    n = len(order)
    ts = np.array([ts_of(k) for k in order])
    b1 = int(ts[min(n - 1, int(n * fracs[0]))])
    b2 = int(ts[min(n - 1, int(n * (fracs[0] + fracs[1])))])
    out = {"train": [], "valid": [], "test": []}
    for k, t in zip(order, ts):
        out["train" if t < b1 else "valid" if t < b2 else "test"].append(k)
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
    return {name: [k for k, r in zip(train, role) if r == code]
            for code, name in enumerate(("train", "rl", "probe"))}


def subsample(rows, n, seed, split):
    """Seeded subset of one split, file order (time order) kept."""
    if n >= len(rows):
        return rows
    rng = np.random.default_rng([seed, common.ALL_SPLITS.index(split)])
    idx = np.sort(rng.choice(len(rows), n, replace=False))
    return [rows[i] for i in idx]


# ---- plumbing: main --------------------------------------------------------------------
def canonical_args(args) -> dict:
    d = {k: v for k, v in vars(args).items() if k not in ("force", "run_dir")}
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
        inter, items, users, truth = make_synthetic(args)
        labels = [truth[(u, i)][0] for u, i, _, _ in inter]
        extras = {k: {"cause": truth[(u, i)][1]} for k, (u, i, _, _) in enumerate(inter)}
        sources, main_file = [], "synthetic"
        label_rule = (f"click ~ Bernoulli(sigmoid({SYNTH_BIAS} + sum of user taste over item genres "
                      f"+ quality))")
    else:
        inter, items, users, sources = readers.LOADERS[args.dataset](args)
        main_file = str(sources[0])
        n0 = len(inter)
        inter = [x for x in inter if x[1] in items]  # [ours] drop ratings of uncatalogued items
        dropped = n0 - len(inter)
        thr = args.label_threshold if args.label_threshold is not None \
            else DEFAULT_THRESHOLD[args.dataset]
        labels = [int(r >= thr) for _, _, _, r in inter]
        label_rule = f"label = rating >= {thr:g}"
    if not inter:
        raise ExpCTRError(f"{main_file}: no interactions left (expected ratings of catalogued items)")
    samples = Samples(inter, labels, users, extras, args.history_len, args.min_history)
    if not samples.order:
        raise ExpCTRError(f"{main_file}: no samples left with >= {args.min_history} history items")
    splits, bounds = temporal_split(samples.order, lambda k: inter[k][2], fracs)
    splits.update(carve_prompt_splits(splits["train"], args.rl_frac, args.probe_frac, args.seed))
    for split, n in max_samples.items():
        splits[split] = subsample(splits[split], n, args.seed, split)
    for split, ks in splits.items():
        if not ks and split in common.SPLITS:  # rl / probe may be empty (--rl-frac 0)
            raise ExpCTRError(f"{main_file}: the {split} split is empty "
                              f"({len(samples.order)} samples, --split-frac {args.split_frac})")

    kept = [k for ks in splits.values() for k in ks]
    used = {inter[k][1] for k in kept} | {inter[h][1] for k in kept for h in samples.hist(k)}
    item_rows = [items[i] for i in sorted(used, key=lambda x: (len(x), x))]
    meta = {
        "dataset": args.dataset,
        "sources": [{"path": str(p), "sha256": readers.sha256(Path(p)), "bytes": Path(p).stat().st_size}
                    for p in sources],
        "counts": {k: len(v) for k, v in splits.items()},
        "pos_rate": {s: round(float(np.mean([labels[k] for k in ks])), 6) if ks else None
                     for s, ks in splits.items()},
        "prompt_partition": {"rl_frac": args.rl_frac, "probe_frac": args.probe_frac, "seed": args.seed,
                             "rule": "seeded permutation of the full train split (before any "
                                     "--max-samples subset): rl and probe samples are removed from "
                                     "train.jsonl, so no reward model or ID model trains on them"},
        "label_rule": label_rule,
        "split_boundaries": bounds,
        "vocab": {"users": len({inter[k][0] for k in kept}),
                  "items": len(item_rows),
                  "genres": len({g for it in item_rows for g in it["genres"]})},
        "user_fields": sorted({f for u in users.values() for f in u}),
        "n_interactions": len(inter), "n_dropped_uncatalogued": dropped,
        "n_samples_before_subset": len(samples.order),
        "args": want,
    }
    if args.dataset == "synthetic":
        # the Bayes-optimal AUC on test (true click probabilities) is the ceiling for any model
        from sklearn.metrics import roc_auc_score
        test = [inter[k][:2] for k in splits["test"]]
        meta["oracle_test_auc"] = round(float(roc_auc_score(
            [truth[x][0] for x in test], [truth[x][2] for x in test])), 4)

    # ---- plumbing: write everything in a temp folder inside the run dir, rename at the end
    created = not paths.root.exists()
    try:
        with common.atomic_path(paths.data) as tmp:
            tmp.mkdir()
            for split, ks in splits.items():
                common.write_jsonl(tmp / f"{split}.jsonl", (samples.row(k) for k in ks))
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
