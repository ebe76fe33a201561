"""Evaluation of ExpCTR: CTR accuracy of every variant and explanation quality, side by side.

Paper part: the experiments (PAPER_NOTES.md §6 "Variants" and the last section "Explanation
quality without ground-truth explanations"). Reads files only: no model is loaded, nothing is
downloaded, torch/transformers are never imported. Layout contract: common.py (RunPaths).

Reads  (R = the run folder)
  R/data/{train,valid,test}.jsonl, items.jsonl, meta.json       samples and catalogue
  R/run.json                                                    "final_tag", "aug" (optional)
  R/ctr/{popularity,logreg,deepfm,dcnv2,din,<aug>}/preds_test.jsonl      rows {uid, iid, label, p}
  R/scorer/preds_test_{none,base,<final_tag>}.jsonl   rows {uid, iid, label, p, p_shuffled}
  R/explanations/{base,<final_tag>}/{valid,test}.jsonl  rows {uid, iid, label, explanation, ...}
  R/probe/{base,iter_k}.jsonl                         the reward probe of each policy (learning curve)
  R/metrics.jsonl                                     rows with stage == "stage3_rl" (PPO training
                                                      statistics; the last row of each iteration)
  R/timings.jsonl                                     per-step wall times of run.sh (last of each step)
Writes
  R/eval/metrics.json  ctr.<variant>.{auc, auc_ci, logloss, gauc, n, ...}, significance.<pair>,
                       explanations.{base,aligned}.{shuffle_auc_drop, probe_auc, ...}
  R/eval/report.md     header, CTR table, explanation table, plots, ten examples
  R/eval/{roc,calibration,ppo}.png   (only when matplotlib is installed)
  metrics.json also has probe (per policy: mean r_LC [CI], difference to base [CI], KL to the
  reference) and probe_constant (the constant predictor at the train positive rate, same prompts).
  one "evaluate" row appended to R/metrics.jsonl; the main CTR table printed on stdout.
Everything is recomputed on each call (it takes seconds); each output is written atomically.

    python evaluate.py --run-dir runs/ml100k
    python evaluate.py --run-dir runs/ml100k --n-boot 2000 --no-plots
"""
from __future__ import annotations

import argparse
import math
import re
import unicodedata
from collections import defaultdict, deque
from pathlib import Path

import numpy as np
from tqdm import tqdm

import common
from common import ExpCTRError, RunPaths
from metrics import auc, gauc, logloss  # noqa: F401 (defined once; tests read them here too)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", required=True, help="run folder written by the stages (runs/<name>)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for CIs/p-values")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and of the examples")
    p.add_argument("--final-tag", default=None, help="aligned explainer tag (default: R/run.json "
                   "final_tag, else the highest iter_k under explanations/ with test.jsonl)")
    p.add_argument("--aug", default=None, help="ExpCTR-Aug folder under ctr/ (default: R/run.json "
                   "aug, else the ctr/aug_* with the highest iter)")
    p.add_argument("--min-title-chars", type=int, default=8, help="[ours] catalogue titles shorter "
                   "than this (normalised) are not checked for hallucination (ordinary words)")
    p.add_argument("--min-ground-chars", type=int, default=4, help="[ours] target/history titles "
                   "shorter than this (normalised) do not count for grounding")
    p.add_argument("--pop-smoothing", type=float, default=None, help="popularity row computed here "
                   "(when R/ctr/popularity is missing): train_ctr.item_click_rates with this "
                   "smoothing (default: train_ctr's)")
    p.add_argument("--n-examples", type=int, default=10, help="test samples shown in the report")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    args = p.parse_args(argv)
    if args.n_boot < 10:
        raise ExpCTRError(f"--n-boot {args.n_boot}: expected at least 10 resamples")
    return args


# ---- algorithm: CTR metrics (auc, logloss, gauc: metrics.py) -------------------------------
def ece(y, p, bins=10) -> float:
    """Expected calibration error over equal-width probability bins."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    b = np.minimum((p * bins).astype(int), bins - 1)
    gap = np.abs(np.bincount(b, y, bins) - np.bincount(b, p, bins))
    return float(gap.sum() / len(y))


def weighted_auc(y, p, W) -> np.ndarray:
    """AUC of scores p under each row of sample weights W [b, n] (bootstrap counts), vectorised:
    sort once by score, group ties, count negatives below each positive (ties count 1/2).
    With W = resample counts this equals roc_auc_score(y[idx], p[idx]) exactly."""
    order = np.argsort(p, kind="mergesort")
    ps, ys, Ws = p[order], y[order].astype(float), W[:, order]
    starts = np.flatnonzero(np.r_[True, ps[1:] != ps[:-1]])
    gp = np.add.reduceat(Ws * ys, starts, axis=1)
    gn = np.add.reduceat(Ws * (1 - ys), starts, axis=1)
    below = np.cumsum(gn, axis=1) - gn
    num = (gp * (below + 0.5 * gn)).sum(1)
    den = gp.sum(1) * gn.sum(1)
    return np.where(den > 0, num / np.maximum(den, 1e-12), np.nan)


def bootstrap_aucs(y, scores: dict, n_boot: int, seed: int) -> dict:
    """AUC of every score vector on the SAME n_boot resamples (paired bootstrap) -> {name: [B]}."""
    y = np.asarray(y)
    n = len(y)
    rng = np.random.default_rng(seed)
    out = {k: [] for k in scores}
    chunk = max(1, min(n_boot, 5_000_000 // max(n, 1)))  # bounds memory of the [b, n] counts
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        idx = rng.integers(0, n, size=(b, n))
        W = np.bincount((idx + n * np.arange(b)[:, None]).ravel(), minlength=b * n).reshape(b, n)
        for k, p in scores.items():
            out[k].append(weighted_auc(y, np.asarray(p, float), W))
    return {k: np.concatenate(v) for k, v in out.items()}


def percentile_ci(boot) -> list:
    b = boot[np.isfinite(boot)]
    return [float(np.percentile(b, 2.5)), float(np.percentile(b, 97.5))] if len(b) else [None, None]


def paired_p_value(boot_a, boot_b) -> float:
    """One-sided bootstrap p-value of H1 "a has the higher AUC": (1 + #{AUC_a <= AUC_b}) / (B + 1)
    over the shared resamples (never exactly 0; identical models give 1)."""
    d = boot_a - boot_b
    d = d[np.isfinite(d)]
    return float((1 + (d <= 0).sum()) / (len(d) + 1))


# ---- algorithm: the reward probe, a learning curve on fixed held-out prompts ----------------------
def probe_curve(paths: RunPaths, train, args) -> tuple[list, dict | None, list]:
    """Mean r_LC of every policy on R/probe/<tag>.jsonl (the same prompts, K and seed for each),
    with a 95% bootstrap CI over prompts (a prompt's K samples are resampled together), the
    difference to the base policy on the same resamples (paired; one-sided p of "no gain"), the
    mean KL to the reference, and the constant predictor (train positive rate) on the same
    prompts. Returns (rows, constant row, notes)."""
    files = {f.stem: f for f in (paths.root / "probe").glob("*.jsonl")}
    tags = sorted((t for t in files if t == "base" or re.fullmatch(r"iter_\d+", t)),
                  key=lambda t: -1 if t == "base" else int(t[5:]))
    if not tags:
        return [], None, []
    data, notes = {}, []
    for t in tags:
        rows = common.read_jsonl(files[t])
        for i, r in enumerate(rows, 1):
            if not all(isinstance(r.get(k), (int, float)) for k in ("group", "r_lc", "label")):
                raise ExpCTRError(f"{files[t]}:{i}: expected numeric 'group', 'r_lc' and 'label'")
        data[t] = rows
    key = lambda rows: [(r["uid"], r["iid"], r["group"]) for r in rows]
    ref = key(data[tags[0]])
    for t in tags[1:]:
        if key(data[t]) != ref:
            notes.append(f"probe/{t}.jsonl has other prompts than probe/{tags[0]}.jsonl: left out "
                         "(not like with like; rerun with --probe {t} --force)")
            tags.remove(t)
    groups = np.array([r["group"] for r in data[tags[0]]])
    n_groups = int(groups.max()) + 1
    per_group = lambda vals: np.bincount(groups, vals, n_groups) / np.bincount(groups, None, n_groups)
    rng = np.random.default_rng(args.seed)
    resample = rng.integers(0, n_groups, size=(args.n_boot, n_groups))
    boot = lambda g: g[resample].mean(1)
    means = {t: per_group(np.array([r["r_lc"] for r in data[t]], float)) for t in tags}
    out = []
    for t in tags:
        g = means[t]
        row = {"tag": t, "iter": 0 if t == "base" else int(t[5:]), "n_prompts": n_groups,
               "n": len(data[t]), "r_lc": float(g.mean()), "r_lc_ci": percentile_ci(boot(g)),
               "kl_ref": float(np.mean([r.get("kl_ref") or 0.0 for r in data[t]]))}
        if t != tags[0]:
            d = boot(g) - boot(means[tags[0]])
            row.update(delta=float(g.mean() - means[tags[0]].mean()), delta_ci=percentile_ci(d),
                       p_value=float((1 + (d <= 0).sum()) / (len(d) + 1)))
        out.append(row)
    const = None
    if train:
        prior = float(np.mean([s["label"] for s in train]))
        y = np.array([r["label"] for r in data[tags[0]]], float)
        g = per_group(y * math.log(prior) + (1 - y) * math.log1p(-prior))
        const = {"tag": "constant", "prior": prior, "r_lc": float(g.mean()), "r_lc_ci": percentile_ci(boot(g))}
    return out, const, notes


# ---- algorithm: explanation text --------------------------------------------------------------
def norm_tokens(text: str) -> list:
    """Lower-case ASCII word tokens (accents stripped, punctuation dropped)."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    return re.findall(r"[a-z0-9]+", text)


def distinct_n(texts, n) -> float:
    """Unique n-grams / total n-grams over the whole corpus (Li et al. 2016)."""
    grams = [tuple(t[i:i + n]) for t in map(norm_tokens, texts) for i in range(len(t) - n + 1)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def usr(texts) -> float:
    """Unique-sentence ratio: distinct explanations (case/punctuation/space-insensitive) / total."""
    norm = [" ".join(norm_tokens(t)) for t in texts]
    return len(set(norm)) / len(norm) if norm else float("nan")


# [ours] Stance rules (listed verbatim in the report). The explanation's predicted attitude is
# the first stance cue that follows a modal (will/would/may/...), else the first cue at all,
# else a leading verdict word; a negator within the 4 tokens before a cue, in the same clause,
# flips it. Past-tense verbs (liked, enjoyed, disliked...) describe the history: never cues.
POS_CUES = {"like", "likes", "love", "loves", "enjoy", "enjoys", "appreciate", "appreciates",
            "adore", "adores", "interested", "appealing", "appeal", "appeals", "click", "fan",
            "recommend", "fit", "match", "resonate", "resonates", "fond", "delight"}
NEG_CUES = {"dislike", "dislikes", "hate", "hates", "detest", "detests", "avoid", "avoids",
            "skip", "uninterested", "unappealing", "disappointed", "disappoint", "boring", "dull"}
NEGATORS = {"not", "never", "no", "unlikely", "hardly", "neither", "nor", "doubt", "doubtful",
            "poor", "bad"}
MODALS = {"will", "would", "may", "might", "could", "should", "shall", "likely", "unlikely",
          "probably", "definitely", "certainly", "going", "be", "is", "are"}
# "like" is also a preposition ("films like Heat"): it is a cue only right after one of these
LIKE_VERB_PREV = MODALS | NEGATORS | {"to", "they", "user", "i", "you", "we", "he", "she",
                                      "also", "really", "do", "does", "did", "truly"}
CLAUSE_BREAKS = {".", ",", ";", ":", "!", "?", "but", "because", "since", "although", "though",
                 "while", "as", "so", "however", "who", "which", "whereas", "yet", "and"}
VERDICT_POS, VERDICT_NEG = {"yes", "positive", "likely", "like"}, {"no", "negative", "unlikely"}
CONTRACTIONS = [("won't", "will not"), ("can't", "can not"), ("shan't", "shall not"),
                ("n't", " not"), ("'ll", " will"), ("'d", " would")]


def stance(text: str) -> int:
    """+1 (will like / click), -1 (will not), 0 (unclear), by the rules above."""
    t = text.lower().replace("\u2019", "'")
    for a, b in CONTRACTIONS:
        t = t.replace(a, b)
    toks = re.findall(r"[a-z]+|[.,;:!?]", t)
    first_any = first_modal = 0
    for i, w in enumerate(toks):
        pol = 1 if w in POS_CUES else -1 if w in NEG_CUES else 0
        if not pol or (w == "like" and (i == 0 or toks[i - 1] not in LIKE_VERB_PREV)):
            continue
        window = []
        for v in reversed(toks[max(0, i - 4):i]):
            if v in CLAUSE_BREAKS:
                break
            window.append(v)
        if any(v in NEGATORS for v in window):
            pol = -pol
        first_any = first_any or pol
        if any(v in MODALS for v in window):
            first_modal = pol
            break
    words = [w for w in toks if w.isalpha()]
    verdict = (1 if words and words[0] in VERDICT_POS else
               -1 if words and words[0] in VERDICT_NEG else 0)
    return first_modal or first_any or verdict


def title_key(title: str) -> tuple:
    """Normalised title tokens: drop parenthetical parts (year, alternative titles), move/strip
    a trailing article ("Usual Suspects, The"), strip a leading "The"/"A"/"An"."""
    t = re.sub(r"\([^)]*\)|\[[^\]]*\]", " ", title).strip()
    t = re.sub(r",\s*(the|a|an|la|le|les|l'|il|el|das|der|die)\s*$", "", t, flags=re.I)
    toks = norm_tokens(t)
    if len(toks) > 1 and toks[0] in ("the", "a", "an"):
        toks = toks[1:]
    return tuple(toks)


# [ours] genre synonyms accepted for grounding/cause recall (plus plurals: -s, -y -> -ies)
GENRE_ALIASES = {"sci fi": ["science fiction", "scifi"], "film noir": ["noir"],
                 "children s": ["children", "kids"], "romance": ["romantic"],
                 "comedy": ["comedic"], "animation": ["animated"], "drama": ["dramatic"],
                 "mystery": ["mysterious"]}


def genre_keys(genre: str) -> set:
    base = " ".join(norm_tokens(genre))
    forms = {base} | set(GENRE_ALIASES.get(base, []))
    forms |= {f + "s" for f in list(forms)} | {f[:-1] + "ies" for f in forms if f.endswith("y")}
    return {tuple(f.split()) for f in forms}


class PhraseIndex:
    """Exact token-sequence lookup: finds every (start, end, key) of known phrases in a text."""

    def __init__(self, keys):
        self.keys, self.lens = set(keys), defaultdict(set)
        for k in self.keys:
            self.lens[k[0]].add(len(k))

    def find(self, toks):
        return [(i, i + n, tuple(toks[i:i + n])) for i, w in enumerate(toks)
                for n in sorted(self.lens.get(w, ())) if tuple(toks[i:i + n]) in self.keys]


# [ours] a title-like span: two or more capitalised words (or numbers), small function words
# allowed between them ("Lost City of the Ancients"); one capitalised word is a sentence start
TITLE_GLUE = {"of", "the", "and", "in", "a", "an", "on", "to", "for", "with", "at"}
TITLE_SPAN = re.compile(r"\b(?:[A-Z][\w'-]*|\d+)(?:\s+(?:(?:" + "|".join(sorted(TITLE_GLUE)) +
                        r")\s+)*(?:[A-Z][\w'-]*|\d+))+")


class Grounder:
    """Grounding / hallucination / invented-title / cause checks of one explanation."""

    def __init__(self, items: dict, min_title_chars: int, min_ground_chars: int):
        self.key = {iid: title_key(it["title"]) for iid, it in items.items()}
        self.genres = {iid: it.get("genres") or [] for iid, it in items.items()}
        self.min_title, self.min_ground = min_title_chars, min_ground_chars
        keys = [k for k in self.key.values() if k and len(" ".join(k)) >= min(min_title_chars,
                                                                               min_ground_chars)]
        self.titles = PhraseIndex(keys)
        self.genre_of = {}  # genre key -> genre name
        for g in {g for gs in self.genres.values() for g in gs}:
            for k in genre_keys(g):
                self.genre_of[k] = g
        self.genre_index = PhraseIndex(self.genre_of)
        self.all_titles = [k for k in self.key.values() if k]  # the whole catalogue
        self.generic = {w for k in self.genre_of for w in k} | TITLE_GLUE | {"user", "i"}

    def invented(self, text: str) -> bool:
        """A title-like span that is no catalogue title, no part of one and contains none (after
        title_key normalisation), and is not only genre words: an invented title."""
        def within(a, b):  # token sequence a occurs inside b
            return any(b[i:i + len(a)] == a for i in range(len(b) - len(a) + 1))
        for m in TITLE_SPAN.finditer(text):
            k = title_key(m.group(0))
            if not k or set(k) <= self.generic:
                continue
            if not any(within(k, t) or within(t, k) for t in self.all_titles):
                return True
        return False

    def check(self, sample: dict, text: str) -> dict:
        toks = norm_tokens(text)
        ok = lambda k: k and len(" ".join(k)) >= self.min_ground
        target = self.key.get(sample["iid"])
        hist = {self.key.get(h[0]) for h in sample["hist"]} - {None}
        found = self.titles.find(toks)
        # longest match wins: "Toy Story 2" does not also name "Toy Story"
        spans = [(a, b, k) for a, b, k in found
                 if not any(a0 <= a and b <= b0 and b0 - a0 > b - a for a0, b0, _ in found)]
        halluc = any(k != target and k not in hist and len(" ".join(k)) >= self.min_title
                     for _, _, k in spans)
        covered = {i for a, b, _ in spans for i in range(a, b)}  # "Star Wars" is not genre "War"
        free = lambda index: {k for a, b, k in index.find(toks) if not covered & set(range(a, b))}
        named = {self.genre_of[k] for k in free(self.genre_index)}
        genres = set(self.genres.get(sample["iid"], []))
        for h in sample["hist"]:
            genres |= set(self.genres.get(h[0], []))
        cause = sample.get("cause")
        return {"target": any(k == target and ok(k) for _, _, k in spans),
                "history": any(k in hist and ok(k) for _, _, k in spans),
                "genre": bool(named & genres), "halluc": halluc, "named_genres": named,
                "invented": self.invented(text),
                "cause": bool(free(PhraseIndex(genre_keys(cause)))) if cause else None}


def cause_choice(test, items, texts: dict, args) -> dict:
    """[ours] Does an explanation pick the planted cause among the target's genres? On test
    targets with >= 2 genres (a real choice): hit = names the cause and no other genre of the
    target; wrong = names a genre of the target that is not the cause. Rows: base, aligned and two
    prompt-echo baselines (restating all target genres: hit 0 by construction; restating the
    first listed one: ~1/2 of targets), with 95% bootstrap CIs and paired differences of aligned
    to base and to the best echo on the same resampled targets (p one-sided, H1: aligned higher)."""
    g = Grounder(items, args.min_title_chars, args.min_ground_chars)
    idx = [i for i, s in enumerate(test) if s.get("cause") and
           len((items.get(s["iid"]) or {}).get("genres", [])) >= 2]
    if not idx:
        return {}
    first = lambda s: prompt_echo(s, {s["iid"]: dict(items[s["iid"]], genres=items[s["iid"]]["genres"][:1])})
    sources = {"echo_all_genres": lambda s: prompt_echo(s, items), "echo_first_genre": first}
    out, hits = {"n": len(idx)}, {}
    for name in ("base", "aligned", *sources):
        if name in sources:
            txt = {i: sources[name](test[i]) for i in idx}
        elif texts.get(name) and all(i in texts[name] for i in idx):
            txt = texts[name]
        else:
            continue
        h, w = [], []
        for i in idx:
            named = g.check(test[i], txt[i])["named_genres"]
            gs, c = set(items[test[i]["iid"]]["genres"]), test[i]["cause"]
            h.append(c in named and not (named & gs) - {c})
            w.append(bool(named & (gs - {c})))
        hits[name] = np.array(h, float)
        out[name] = {"cause_hit": float(np.mean(h)), "wrong_genre": float(np.mean(w))}
    rng = np.random.default_rng([args.seed, 2])
    B = rng.integers(0, len(idx), size=(args.n_boot, len(idx)))
    for name, v in hits.items():
        out[name]["cause_hit_ci"] = percentile_ci(v[B].mean(1))
    best_echo = max((k for k in sources if k in hits), key=lambda k: hits[k].mean())
    for other in ("base", best_echo):
        if "aligned" in hits and other in hits:
            d = (hits["aligned"] - hits[other])[B].mean(1)
            out[f"aligned_minus_{other}"] = {"delta": float((hits["aligned"] - hits[other]).mean()),
                                             "ci": percentile_ci(d), "p_value": float(np.mean(d <= 0))}
    return out


def probe_auc(train_texts, train_y, test_texts, test_y) -> float:
    """[ours] TF-IDF (1-2 grams) + logistic regression fitted on valid explanations; test AUC of
    the click predicted from the explanation text alone."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    if len(set(train_y)) < 2 or len(set(test_y)) < 2:
        return float("nan")
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    clf = LogisticRegression(max_iter=1000).fit(vec.fit_transform(train_texts), train_y)
    return auc(test_y, clf.predict_proba(vec.transform(test_texts))[:, 1])


# ---- plumbing: reading the run folder ----------------------------------------------------------
def positions(rows, test, where) -> np.ndarray:
    """Index in data/test.jsonl of each row, matched on (uid, iid) (k-th duplicate -> k-th
    duplicate); -1 when the row is not a test sample. A label that differs is an error."""
    slots = defaultdict(deque)
    for j, s in enumerate(test):
        slots[(str(s["uid"]), str(s["iid"]))].append(j)
    pos = np.full(len(rows), -1)
    for i, r in enumerate(rows):
        if "uid" not in r or "iid" not in r:
            raise ExpCTRError(f"{where}: row {i + 1}: missing field 'uid' or 'iid'")
        q = slots.get((str(r["uid"]), str(r["iid"])))
        if q:
            pos[i] = q.popleft()
            if r.get("label") is not None and r["label"] != test[pos[i]]["label"]:
                raise ExpCTRError(f"{where}: row {i + 1}: label {r['label']} but data/test.jsonl "
                                  f"has {test[pos[i]]['label']} for uid {r['uid']} iid {r['iid']}")
    return pos


def read_preds(path: Path, test, cols=("p",)) -> dict:
    """{col: float array over the test samples, nan where the file has no row}."""
    rows = common.read_jsonl(path)
    pos = positions(rows, test, path)
    if (pos < 0).all():
        raise ExpCTRError(f"{path}: none of its {len(rows)} rows is a sample of data/test.jsonl "
                          "(matched on uid, iid): was it made from another data split?")
    out = {c: np.full(len(test), np.nan) for c in cols}
    for i, r in enumerate(rows):
        for c in cols:
            v = r.get(c)
            if c == "p" and not (isinstance(v, (int, float)) and 0 <= v <= 1):
                raise ExpCTRError(f"{path}: row {i + 1}: field 'p' should be a probability in "
                                  f"[0, 1], got {v!r}")
            if c == "p_shuffled" and isinstance(v, list):  # one value per permutation
                if not isinstance(out[c], list):
                    out[c] = [np.full(len(test), np.nan) for _ in v]
                if len(v) != len(out[c]):
                    raise ExpCTRError(f"{path}: row {i + 1}: field 'p_shuffled' has {len(v)} "
                                      f"values, earlier rows {len(out[c])}")
                for j, x in enumerate(v):
                    if pos[i] >= 0 and isinstance(x, (int, float)) and math.isfinite(x):
                        out[c][j][pos[i]] = x
            elif pos[i] >= 0 and isinstance(v, (int, float)) and math.isfinite(v):
                out[c][pos[i]] = v
    for c in cols:  # p_shuffled: [S, n] (S permutations; an old file's single value gives S=1)
        if c == "p_shuffled":
            out[c] = np.array(out[c] if isinstance(out[c], list) else [out[c]])
    out["n_extra"] = int((pos < 0).sum())
    return out


def resolve_tags(paths: RunPaths, args, run_info: dict):
    iter_no = lambda name: int(m.group(1)) if (m := re.search(r"iter_(\d+)$", name)) else -1
    final = args.final_tag or run_info.get("final_tag")
    if not final:
        cands = [d.name for d in (paths.root / "explanations").glob("iter_*")
                 if (d / "test.jsonl").exists()]
        final = max(cands, key=lambda n: (iter_no(n), n)) if cands else None
    aug = args.aug or run_info.get("aug")
    if not aug:
        cands = [d.name for d in (paths.root / "ctr").glob("aug_*") if d.is_dir()]
        done = [c for c in cands if (paths.ctr(c) / "preds_test.jsonl").exists()] or cands
        aug = max(done, key=lambda n: (iter_no(n), n)) if done else None
    # the main ID backbone: the one ExpCTR-Aug was built on, else DIN, DeepFM, DCNv2
    cands = ([re.sub(r"^aug_|_iter_\d+$", "", aug)] if aug else []) + ["din", "deepfm", "dcnv2"]
    main_bb = next((c for c in cands if (paths.ctr(c) / "preds_test.jsonl").exists()), cands[0])
    return final, aug, main_bb


def variant_specs(R: str, paths: RunPaths, final, aug, main_bb) -> dict:
    """name -> (what it is, preds file or None, command that produces it)."""
    f_tag, a_name = final or "iter_N", aug or f"aug_{main_bb}_iter_N1"
    emb_tag = it.group(0) if (it := re.search(r"iter_\w+$", a_name)) else "iter_N1"
    sc = lambda tag: paths.scorer / f"preds_test_{tag}.jsonl"
    ctr = lambda name: paths.ctr(name) / "preds_test.jsonl"
    sft = lambda tag: f"python stage1_sft.py --run-dir {R} --predict {tag} --split test"
    spec = {"popularity": ("item's training positive rate", ctr("popularity"),
                           f"python train_ctr.py --run-dir {R} --model popularity"),
            "logreg": ("logistic regression on ID features", ctr("logreg"),
                       f"python train_ctr.py --run-dir {R} --model logreg"),
            "id_ctr": (f"ID-only backbone ({main_bb}, main)", ctr(main_bb),
                       f"python train_ctr.py --run-dir {R} --model {main_bb}")}
    for m in ("deepfm", "dcnv2", "din"):
        spec[f"id_ctr_{m}"] = (f"ID-only {m}", ctr(m), f"python train_ctr.py --run-dir {R} --model {m}")
    spec["llm_ctr"] = ("LLM scorer, no explanation (TALLRec-style)", sc("none"), sft("none"))
    spec["posthoc"] = ("LLM scorer reading base-model explanations", sc("base"), sft("base"))
    spec["expctr_llm"] = (f"ExpCTR-LLM: scorer reading {f_tag} explanations",
                          sc(final) if final else None,
                          sft(f_tag) if final else "./run.sh (the RL schedule) then " + sft(f_tag))
    spec["expctr_aug"] = (f"ExpCTR-Aug: {main_bb} + explanation embeddings ({a_name}, reading "
                          f"{emb_tag} explanations)", ctr(aug) if aug else None,
                          f"python train_ctr.py --run-dir {R} --model {main_bb} --text-emb "
                          f"'{R}/explanations/{emb_tag}/{{split}}.npy' --init-from {R}/ctr/{main_bb} "
                          f"--out-name {a_name}")
    # [ours] the same Aug model reading the final (IC-aligned) policy's explanations: the model
    # r_IC scored during phase 3, on the explanations phase 3 produced
    af = f"{a_name}_on_{f_tag}"
    spec["expctr_aug_final"] = (f"ExpCTR-Aug: {a_name} reading {f_tag} explanations",
                                ctr(af) if aug and final and ctr(af).exists() else None,
                                f"python train_ctr.py --run-dir {R} --model {main_bb} --epochs 0 "
                                f"--init-from {R}/ctr/{a_name} --text-emb "
                                f"'{R}/explanations/{f_tag}/{{split}}.npy' --out-name {af}")
    return spec


# ---- algorithm: the two tables -----------------------------------------------------------------
def ctr_table(paths, test, train, spec, args):
    """Returns (ctr dict, significance dict, common mask, preds on common samples, notes)."""
    preds, notes = {}, []
    for name, (_, path, _) in spec.items():
        if path is not None and path.exists():
            r = read_preds(path, test)
            preds[name] = r["p"]
            if r["n_extra"]:
                notes.append(f"{name}: {r['n_extra']} rows of {path.name} are not test samples "
                             "(ignored)")
        elif name == "popularity" and train is not None:
            import train_ctr
            a = train_ctr.POP_SMOOTHING if args.pop_smoothing is None else args.pop_smoothing
            rates, prior = train_ctr.item_click_rates(train, a)
            preds[name] = np.array([rates.get(s["iid"], prior) for s in test])
            notes.append("popularity: computed here from data/train.jsonl "
                         f"(train_ctr.item_click_rates, smoothing {a:g})")
    mask = np.ones(len(test), bool)
    for name, p in preds.items():
        cov = np.isfinite(p)
        if not cov.all():
            notes.append(f"{name} covers {int(cov.sum())} of {len(test)} test samples")
        mask &= cov
    if preds and not mask.all():
        notes.append(f"all rows use the {int(mask.sum())} test samples every available variant "
                     "covers (intersection)")
    if preds and not mask.any():
        raise ExpCTRError("the available variants share no test sample: " + "; ".join(notes))
    y = np.array([s["label"] for s in test])[mask]
    uids = [s["uid"] for s, m in zip(test, mask) if m]
    P = {k: v[mask] for k, v in preds.items()}
    boot = bootstrap_aucs(y, P, args.n_boot, args.seed) if P else {}
    out = {}
    for name, (what, path, cmd) in spec.items():
        row = {"auc": None, "auc_ci": None, "logloss": None, "gauc": None, "n": None, "ece": None,
               "what": what, "source": str(path.relative_to(paths.root)) if path else None}
        if name in P:
            p = P[name]
            row.update(status="ok", auc=auc(y, p), auc_ci=percentile_ci(boot[name]),
                       logloss=logloss(y, p), gauc=gauc(y, p, uids), n=int(len(y)), ece=ece(y, p))
            if name == "popularity" and not (path and path.exists()):
                row["source"] = "data/train.jsonl (computed by evaluate.py)"
        else:
            row.update(status="not run", produce=cmd)
        out[name] = row
    sig = {}
    for a, b in (("expctr_llm", "posthoc"), ("expctr_aug", "id_ctr"), ("expctr_aug_final", "id_ctr")):
        s = {"delta_auc": None, "delta_ci": None, "p_value": None, "n_boot": args.n_boot,
             "test": f"paired bootstrap, one-sided, H1: AUC({a}) > AUC({b})"}
        if a in P and b in P:
            s.update(delta_auc=out[a]["auc"] - out[b]["auc"],
                     delta_ci=percentile_ci(boot[a] - boot[b]), p_value=paired_p_value(boot[a], boot[b]))
            if b == "id_ctr":  # [ours] ExpCTR-Aug should be no worse than its own backbone
                s["noninferiority_margin"] = NI_MARGIN
                s["noninferior"] = bool(s["delta_ci"][0] is not None and s["delta_ci"][0] > -NI_MARGIN)
        sig[f"{a}_vs_{b}"] = s
    return out, sig, mask, P, y, notes


NI_MARGIN = 0.005  # non-inferiority margin of ExpCTR-Aug vs its ID backbone (AUC)


def shuffle_drop(y, p, p_sh, n_boot: int, seed: int) -> dict:
    """Faithfulness: scorer AUC minus its mean AUC over S permutations of the explanations across
    samples (p_sh [S, n]). CI: paired bootstrap over samples, and in each replicate the S
    permutations are redrawn with replacement, so the spread across permutations is in the CI;
    p = one-sided share of replicates with a drop <= 0."""
    S = len(p_sh)
    b = bootstrap_aucs(y, {"p": p, **{f"s{j}": p_sh[j] for j in range(S)}}, n_boot, seed)
    pick = np.random.default_rng([seed, 1]).integers(0, S, size=(n_boot, S))
    sh = np.stack([b[f"s{j}"] for j in range(S)], 1)  # [B, S]
    boot = b["p"] - np.take_along_axis(sh, pick, 1).mean(1)
    a, a_sh = auc(y, p), float(np.mean([auc(y, x) for x in p_sh]))
    return {"auc_with_expl": a, "auc_shuffled": a_sh, "shuffle_auc_drop": a - a_sh,
            "shuffle_auc_drop_ci": percentile_ci(boot), "n_shuffles": S,
            "shuffle_auc_drop_p": float(np.mean(boot[np.isfinite(boot)] <= 0))}


EXPL_KEYS = ["n", "auc_with_expl", "auc_shuffled", "shuffle_auc_drop", "shuffle_auc_drop_ci",
             "shuffle_auc_drop_p", "n_shuffles", "probe_auc", "stance_agreement",
             "stance_agreement_clear", "stance_clear", "stance_label_agreement", "grounding",
             "grounding_target", "grounding_history", "grounding_genre", "hallucination",
             "invented_title", "distinct_1", "distinct_2", "usr", "mean_words", "cause_recall"]


def prompt_echo(sample: dict, items: dict) -> str:
    """[ours] The prompt-echo baseline: an "explanation" that only restates the target and its
    genres, as an explainer copying its prompt would. Every text metric is also reported for it."""
    it = items.get(sample["iid"]) or {}
    genres = " and ".join(it.get("genres") or []) or "a"
    return f"The user would view {it.get('title', 'the item')} as a {genres} film."


def text_metrics(res, texts, idx, y, test, valid_pairs, items, pred, args, tag):
    """The metrics that need only the texts (and the scorer's predictions, when given); shares
    come with a 95% bootstrap CI (key + '_ci') over the test samples."""
    rng = np.random.default_rng([args.seed, 3])
    B = rng.integers(0, len(texts), size=(min(args.n_boot, 2000), len(texts))) if texts else None
    share = lambda v: (float(np.mean(v)), percentile_ci(np.asarray(v, float)[B].mean(1))) \
        if len(v) else (None, None)

    def put(key, v, ci=True):
        res[key], c = share(v)
        if ci:
            res[key + "_ci"] = c
    res.update(status="ok", n=len(texts), distinct_1=distinct_n(texts, 1),
               distinct_2=distinct_n(texts, 2), usr=usr(texts),
               mean_words=float(np.mean([len(t.split()) for t in texts])) if texts else None)
    if valid_pairs:
        res["probe_auc"] = probe_auc([t for t, _ in valid_pairs], [v for _, v in valid_pairs], texts, y)
    st = np.array([stance(t) for t in tqdm(texts, desc=f"stance {tag}", leave=False, mininterval=2)])
    put("stance_clear", st != 0)
    put("stance_label_agreement", st == 2 * y - 1)
    if pred is not None:
        has = np.isfinite(pred[idx])
        if has.any():
            click = np.where(pred[idx][has] >= 0.5, 1, -1)
            agree = st[has] == click
            res["stance_agreement"] = float(agree.mean())
            clear = st[has] != 0
            res["stance_agreement_clear"] = float(agree[clear].mean()) if clear.any() else None
    if items:
        g = Grounder(items, args.min_title_chars, args.min_ground_chars)
        checks = [g.check(test[i], t) for i, t in tqdm(list(zip(idx, texts)), desc=f"grounding {tag}",
                                                        leave=False, mininterval=2)]
        put("grounding", [c["target"] or c["history"] or c["genre"] for c in checks])
        put("grounding_target", [c["target"] for c in checks])
        put("grounding_history", [c["history"] for c in checks], ci=False)
        put("grounding_genre", [c["genre"] for c in checks], ci=False)
        put("hallucination", [c["halluc"] for c in checks])
        put("invented_title", [c["invented"] for c in checks])
        causes = [c["cause"] for c in checks if c["cause"] is not None]
        res["cause_recall"] = float(np.mean(causes)) if causes else None
    else:
        res["notes"].append("no data/items.jsonl: grounding skipped")


def valid_pairs_of(paths, valid, tag):
    """(explanation, label) pairs of R/explanations/<tag>/valid.jsonl (the probe's training set)."""
    vf = paths.explanations(tag, "valid")
    if not vf.exists():
        return None
    vrows = common.read_jsonl(vf)
    aligned = valid is not None and len(valid) == len(vrows)  # contract: row-aligned
    vy = [r["label"] if r.get("label") is not None else valid[j]["label"] if aligned else None
          for j, r in enumerate(vrows)]
    return [(r.get("explanation"), v) for r, v in zip(vrows, vy)
            if isinstance(r.get("explanation"), str) and v is not None]


def echo_table(test, valid, items, args):
    """The text metrics of the prompt-echo baseline on every test sample (no scorer metrics)."""
    res = {k: None for k in EXPL_KEYS}
    res.update(tag="prompt echo", notes=[])
    if not items:
        res["status"] = "not run"
        return res
    texts = [prompt_echo(s, items) for s in test]
    pairs = [(prompt_echo(s, items), s["label"]) for s in valid] if valid else None
    text_metrics(res, texts, np.arange(len(test)), np.array([s["label"] for s in test]), test,
                 pairs, items, None, args, "echo")
    return res


def explanation_table(paths, R, test, valid, items, tag, args):
    """Explanation-quality metrics of one explainer tag (None = not produced yet)."""
    res = {k: None for k in EXPL_KEYS}
    res.update(tag=tag, status="not run", notes=[])
    f = paths.explanations(tag, "test") if tag else None
    if f is None or not f.exists():
        res["produce"] = (f"python stage2_reward.py --run-dir {R} --split valid,test --tag {tag}"
                          if tag else "./run.sh (the RL schedule makes explanations/iter_k/)")
        return res, None
    rows = common.read_jsonl(f)
    pos = positions(rows, test, f)
    keep = [(i, r) for i, r in zip(pos, rows) if i >= 0]
    for i, r in keep:
        if not isinstance(r.get("explanation"), str):
            raise ExpCTRError(f"{f}: uid {r.get('uid')} iid {r.get('iid')}: field 'explanation' "
                              "should be a string")
    idx = np.array([i for i, _ in keep], int)
    texts = [r["explanation"] for _, r in keep]
    y = np.array([test[i]["label"] for i in idx])
    # faithfulness: the scorer's AUC drop when explanations are permuted across samples
    sp = paths.scorer / f"preds_test_{tag}.jsonl"
    pred = None
    if sp.exists():
        sc = read_preds(sp, test, cols=("p", "p_shuffled"))
        pred = sc["p"]
        m = np.isfinite(sc["p"]) & np.isfinite(sc["p_shuffled"]).all(0)
        yy = np.array([s["label"] for s in test])[m]
        if m.any():
            res.update(shuffle_drop(yy, sc["p"][m], sc["p_shuffled"][:, m], args.n_boot, args.seed))
        else:
            res["notes"].append(f"{sp.name} has no p_shuffled values")
    else:
        res["notes"].append(f"no {sp.relative_to(paths.root)}: run `python stage1_sft.py --run-dir "
                            f"{R} --predict {tag} --split test` for shuffle drop and stance agreement")
    pairs = valid_pairs_of(paths, valid, tag)
    if pairs is None:
        res["notes"].append(f"no {paths.explanations(tag, 'valid').relative_to(paths.root)}: "
                            "probe skipped")
    text_metrics(res, texts, idx, y, test, pairs, items, pred, args, tag)
    return res, dict(zip(idx.tolist(), texts))


# ---- plumbing: plots (matplotlib is optional, imported lazily) --------------------------------
def pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


def make_plots(out_dir: Path, y, P, ppo_rows, probe_rows, probe_const) -> list:
    plt = pyplot()
    if plt is None:
        return []
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import roc_curve
    made = []

    def save(fig, name):
        with common.atomic_path(out_dir / name) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        made.append(name)

    if P:
        fig, ax = plt.subplots(figsize=(6, 5.5))
        for k, p in P.items():
            fpr, tpr, _ = roc_curve(y, p)
            ax.plot(fpr, tpr, label=f"{k} ({auc(y, p):.3f})")
        ax.plot([0, 1], [0, 1], "k:", lw=1)
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC, test")
        ax.legend(fontsize=7)
        save(fig, "roc.png")
        fig, ax = plt.subplots(figsize=(6, 5.5))
        for k, p in P.items():
            frac, mean_p = calibration_curve(y, p, n_bins=10, strategy="quantile")
            ax.plot(mean_p, frac, marker="o", ms=3, label=k)
        ax.plot([0, 1], [0, 1], "k:", lw=1)
        ax.set(xlabel="mean predicted probability (decile bins)", ylabel="observed click rate",
               title="Calibration (reliability), test")
        ax.legend(fontsize=7)
        save(fig, "calibration.png")
    if ppo_rows or probe_rows:
        from matplotlib.ticker import MaxNLocator
        fig, axes = plt.subplots(1, 4, figsize=(15, 3.2), sharex=True)
        ax = axes[0]
        if probe_rows:
            it = [r["iter"] for r in probe_rows]
            mid = np.array([r["r_lc"] for r in probe_rows])
            lo = mid - np.array([r["r_lc_ci"][0] for r in probe_rows])
            hi = np.array([r["r_lc_ci"][1] for r in probe_rows]) - mid
            ax.errorbar(it, mid, yerr=[lo, hi], fmt="o-", color="tab:green", capsize=3,
                        label="policy (95% CI)")
            if probe_const:
                ax.axhline(probe_const["r_lc"], color="k", ls=":", lw=1, label="constant predictor")
            ax.legend(fontsize=7)
        ax.set(title="reward probe: mean r_LC, fixed prompts", xlabel="policy (0 = base)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for ax, key in zip(axes[1:], ("r_lc", "r_ic", "kl")):
            pts = [(r["iter"], r[key]) for r in ppo_rows if r[key] is not None]
            if pts:
                ax.plot(*zip(*pts), color="0.6", lw=1)
            for phase, colour in (("lc", "tab:blue"), ("ic", "tab:orange")):
                pts = [(r["iter"], r[key]) for r in ppo_rows if r["phase"] == phase and r[key] is not None]
                if pts:
                    ax.plot(*zip(*pts), "o", color=colour, label=f"{phase.upper()} phase")
            ax.set(title=f"training draw: {key}" if key != "kl" else "training: KL to reference",
                   xlabel="PPO iteration")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        save(fig, "ppo.png")
    return made


PPO_KEYS = ("reward", "r_lc", "r_ic", "kl", "ratio_first_step")


def ppo_curve(paths: RunPaths) -> list:
    """PPO training statistics per iteration: the LAST stage3_rl row of each iteration in
    metrics.jsonl (a re-run with --force appends a new row; the latest describes policy/iter_k)."""
    if not paths.metrics.exists():
        return []
    last = {}
    for r in common.read_jsonl(paths.metrics):
        if r.get("stage") == "stage3_rl" and r.get("iter") is not None:
            last[int(r["iter"])] = r
    num = lambda v: float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None
    return [{"iter": it, "phase": r.get("phase") or "lc", **{k: num(r.get(k)) for k in PPO_KEYS}}
            for it, r in sorted(last.items())]


def step_timings(paths: RunPaths) -> list:
    """run.sh's wall time per step: the last row of each step in R/timings.jsonl (a resumed run
    appends rows for the steps it ran again)."""
    f = paths.root / "timings.jsonl"
    if not f.exists():
        return []
    last = {}
    for r in common.read_jsonl(f):
        if r.get("step") is not None:
            last.pop(r["step"], None)  # keep the order of the latest run
            last[r["step"]] = r.get("seconds")
    return [{"step": k, "seconds": v} for k, v in last.items()]


# ---- plumbing: report ------------------------------------------------------------------------------
def fmt(x, d=4):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{d}f}"


def auc_cell(r):
    return "not run" if r["status"] != "ok" else \
        f"{fmt(r['auc'])} [{fmt(r['auc_ci'][0])}, {fmt(r['auc_ci'][1])}]"


def table_rows(ctr, main_bb):
    """Table order; the main backbone appears once, as id_ctr."""
    return [k for k in ("popularity", "logreg", "id_ctr", "id_ctr_deepfm", "id_ctr_dcnv2",
                        "id_ctr_din", "llm_ctr", "posthoc", "expctr_llm", "expctr_aug",
                        "expctr_aug_final") if k != f"id_ctr_{main_bb}"]


def text_table(ctr, main_bb) -> str:
    head = ("variant", "AUC [95% CI]", "LogLoss", "gAUC", "n")
    rows = [(k, auc_cell(ctr[k]), fmt(ctr[k]["logloss"]), fmt(ctr[k]["gauc"]),
             str(ctr[k]["n"] or "-")) for k in table_rows(ctr, main_bb)]
    w = [max(len(r[i]) for r in [head] + rows) for i in range(5)]
    line = lambda r: "  ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip()
    return "\n".join([line(head), line(["-" * x for x in w])] + [line(r) for r in rows])


STANCE_RULES = [
    "contractions expanded (won't -> will not, n't -> not, 'll -> will, 'd -> would)",
    "positive cues: " + ", ".join(sorted(POS_CUES)),
    "negative cues: " + ", ".join(sorted(NEG_CUES)),
    "a cue is flipped when one of (" + ", ".join(sorted(NEGATORS)) + ") occurs within the 4 "
    "tokens before it, in the same clause (clauses break at punctuation and " +
    ", ".join(sorted(w for w in CLAUSE_BREAKS if w.isalpha())) + ")",
    "'like' is a cue only right after a modal, negator, pronoun or 'to' (not 'films like X')",
    "stance = the first cue preceded by a modal/copula (" + ", ".join(sorted(MODALS)) + "); "
    "else the first cue; else a leading verdict word (yes/positive/likely/like vs "
    "no/negative/unlikely); else unclear",
    "past-tense verbs (liked, enjoyed, disliked, ...) describe the history and are never cues",
]
EXPL_ROWS = [("shuffle_auc_drop", "faithfulness: scorer AUC minus AUC with shuffled explanations"),
             ("auc_with_expl", "scorer AUC reading these explanations"),
             ("auc_shuffled", "scorer AUC, explanations permuted across test samples"),
             ("probe_auc", "TF-IDF + logistic-regression probe (fit on valid), test AUC"),
             ("stance_agreement", "stance agrees with the scorer's click (p >= 0.5), all"),
             ("stance_agreement_clear", "... among explanations with a clear stance"),
             ("stance_clear", "share with a clear stance (will / will not like)"),
             ("stance_label_agreement", "stance agrees with the true label, all"),
             ("grounding", "names the target, a history item or one of their genres"),
             ("grounding_target", "names the target title"),
             ("grounding_history", "names a history title"),
             ("grounding_genre", "names a target/history genre"),
             ("hallucination", "names a catalogue title that is neither target nor history"),
             ("invented_title", "names a title-like span (2+ capitalised words) matching no catalogue title"),
             ("distinct_1", "unique unigrams / unigrams"), ("distinct_2", "unique bigrams / bigrams"),
             ("usr", "unique explanations / explanations"), ("mean_words", "words per explanation"),
             ("cause_recall", "synthetic: names the planted cause genre"), ("n", "explanations")]


def report_md(m, examples, plots, plot_note, ppo) -> str:
    ctr, main_bb = m["ctr"], m["main_backbone"]
    L = [f"# ExpCTR evaluation: {m['run_name']}", "",
         f"- dataset: **{m['dataset']}**; test samples: **{m['n_test']}** "
         f"(positive rate {fmt(m['pos_rate'], 3)}); CTR rows use **{m['n_common']}** common samples",
         f"- aligned explainer (final tag): **{m['final_tag'] or 'none yet'}**; ExpCTR-Aug model: "
         f"**{m['aug'] or 'none yet'}**; main ID backbone: **{main_bb}**",
         f"- bootstrap: {m['n_boot']} resamples, seed {m['seed']}"]
    if m.get("oracle_test_auc") is not None:
        L.append(f"- synthetic world: the true click probabilities reach AUC {m['oracle_test_auc']} "
                 "on test (ceiling for every model)")
    L += ["", "**How to read this.** Table 1: higher AUC/gAUC and lower LogLoss are better; the "
          "bracket is a 95% bootstrap interval; p-values compare two variants on the same "
          "resampled test sets. Table 2 asks whether explanations reflect the prediction: "
          "*faithfulness* (shuffle drop) is how much the scorer's AUC falls when each sample gets "
          "another sample's explanation (near 0 = the scorer ignores them); the *probe* shows how "
          "much click signal the text alone carries (it can also pick up item identity); *stance "
          "agreement* checks that the stated like/dislike matches the predicted click; grounding "
          "and hallucination check the named titles; distinct-n/USR measure diversity (low = "
          "templated text).", "", "## 1. CTR accuracy (test)", "",
          "| variant | what | AUC [95% CI] | LogLoss | gAUC | n |", "|---|---|---|---|---|---|"]
    for k in table_rows(ctr, main_bb):
        r = ctr[k]
        L.append(f"| {k} | {r['what']} | {auc_cell(r)} | {fmt(r['logloss'])} | {fmt(r['gauc'])} "
                 f"| {r['n'] or '-'} |")
    L.append("")
    L += [f"- `{k}` not run: produce it with `{ctr[k]['produce']}`"
          for k in table_rows(ctr, main_bb) if ctr[k]["status"] != "ok"]
    for name, s in m["significance"].items():
        L.append(f"- {s['test']}: " + (f"ΔAUC {fmt(s['delta_auc'])} [{fmt(s['delta_ci'][0])}, "
                                       f"{fmt(s['delta_ci'][1])}], p = {fmt(s['p_value'])}"
                                       if s["p_value"] is not None else "not available (a side is not run)")
                 + (f"; non-inferior at margin {s['noninferiority_margin']} (CI lower bound > "
                    f"-{s['noninferiority_margin']}): {'yes' if s['noninferior'] else 'no'}"
                    if "noninferior" in s else ""))
    L += [f"- note: {n}" for n in m["notes"]]
    L += ["", "## 2. Explanation quality (test)", "",
          f"| metric | base ({m['explanations']['base']['tag']}) | aligned "
          f"({m['explanations']['aligned']['tag'] or 'none'}) | prompt echo (baseline) | meaning |",
          "|---|---|---|---|---|"]
    E = m["explanations"]
    for k, what in EXPL_ROWS:
        cell = lambda s: "not run" if E.get(s, {}).get("status") != "ok" else (
            str(E[s][k]) if k == "n" else fmt(E[s][k]) + (
                f" [{fmt(E[s][k + '_ci'][0])}, {fmt(E[s][k + '_ci'][1])}]"
                if E[s].get(k + "_ci") and E[s][k + "_ci"][0] is not None else ""))
        L.append(f"| {k} | {cell('base')} | {cell('aligned')} | {cell('echo')} | {what} |")
    L.append("")
    L.append("The prompt echo restates the target and its genres (\"The user would view <title> as a "
             "<genres> film.\"): a metric it scores well on is good by construction, not evidence. "
             "Brackets: 95% bootstrap CI over test samples (shuffle drop: also over the "
             f"{E['aligned'].get('n_shuffles') or E['base'].get('n_shuffles') or '?'} permutations).")
    L.append("")
    for s in ("base", "aligned"):
        if E[s]["status"] != "ok":
            L.append(f"- {s} explanations not run: produce them with `{E[s]['produce']}`")
        L += [f"- {s}: {n}" for n in E[s]["notes"]]
    L += ["- grounding/hallucination match titles case-insensitively after dropping parenthetical "
          "parts (year, alternative titles) and a leading/trailing article; hallucination only "
          f"catches titles of data/items.jsonl of >= {m['min_title_chars']} characters (shorter ones "
          "such as 'Heat' are ordinary words); invented_title flags a span of two or more capitalised "
          "words (function words allowed between them) that is no catalogue title, contains none "
          "and is part of none, and is not only genre words",
          "- stance rules [ours]:"] + [f"  - {r}" for r in STANCE_RULES]
    cc = m.get("cause_choice") or {}
    if cc:
        L += ["", f"**Cause choice** (synthetic; {cc['n']} test targets with >= 2 genres): hit = names "
              "the planted cause and no other genre of the target; wrong = names a target genre that "
              "is not the cause; the echo rows are prompt-echo baselines (restate the target's genres).",
              "", "| explanations | cause hit [95% CI] | names a wrong genre |", "|---|---|---|"]
        for k in ("base", "aligned", "echo_all_genres", "echo_first_genre"):
            if k in cc:
                L.append(f"| {k} | {fmt(cc[k]['cause_hit'])} [{fmt(cc[k]['cause_hit_ci'][0])}, "
                         f"{fmt(cc[k]['cause_hit_ci'][1])}] | {fmt(cc[k]['wrong_genre'])} |")
        for k, d in cc.items():
            if k.startswith("aligned_minus_"):
                L.append(f"- {k}: Δ {fmt(d['delta'])} [{fmt(d['ci'][0])}, {fmt(d['ci'][1])}], "
                         f"p = {fmt(d['p_value'])} (paired bootstrap, one-sided)")
    L += ["", "## 3. Plots", ""]
    L += [f"![{p}]({p})" for p in plots] or [f"Plots skipped: {plot_note}."]
    L += ["", "**Reward probe** (the learning curve): mean r_LC of each policy on the same held-out "
          "prompts of data/probe.jsonl (never trained on by the scorer, the ID models or the "
          "policy), the same K samples per prompt and the same sampling seed; 95% bootstrap CI "
          "over prompts; Δ = difference to the base policy on the same resamples, p = one-sided "
          "(H1: the policy beats base); KL = mean sequence KL to the reference on these samples.", ""]
    if m["probe"]:
        L += ["| policy | n prompts x K | mean r_LC [95% CI] | Δ vs base [95% CI] | p | KL to ref |",
              "|---|---|---|---|---|---|"]
        for r in m["probe"]:
            d = (f"{fmt(r['delta'])} [{fmt(r['delta_ci'][0])}, {fmt(r['delta_ci'][1])}]"
                 if r.get("delta") is not None else "-")
            L.append(f"| {r['tag']} | {r['n_prompts']} x {r['n'] // max(r['n_prompts'], 1)} | "
                     f"{fmt(r['r_lc'])} [{fmt(r['r_lc_ci'][0])}, {fmt(r['r_lc_ci'][1])}] | {d} | "
                     f"{fmt(r.get('p_value'))} | {fmt(r['kl_ref'])} |")
        c = m["probe_constant"]
        if c:
            L.append(f"| constant predictor (p = {fmt(c['prior'], 3)}, train rate) | same prompts | "
                     f"{fmt(c['r_lc'])} [{fmt(c['r_lc_ci'][0])}, {fmt(c['r_lc_ci'][1])}] | - | - | - |")
    else:
        L.append("no probe files yet (python stage2_reward.py --run-dir R --probe base, then iter_k)")
    L += [f"- note: {n}" for n in m["probe_notes"]]
    L += ["", "PPO training statistics (the last stage3_rl row of each iteration in metrics.jsonl; "
          "means over that iteration's own prompts, which differ between iterations, so this is "
          "not a learning curve; ratio_first_step should be 1):", ""]
    if ppo:
        L += ["| iter | phase | reward | r_LC | r_IC | KL | ratio at first step |",
              "|---|---|---|---|---|---|---|"]
        L += [f"| {r['iter']} | {r['phase']} | {fmt(r['reward'])} | {fmt(r['r_lc'])} | "
              f"{fmt(r['r_ic'])} | {fmt(r['kl'])} | {fmt(r['ratio_first_step'], 6)} |" for r in ppo]
    else:
        L.append("no stage3_rl rows yet (run the RL schedule: ./run.sh)")
    if m["timings"]:
        L += ["", "Wall time per step of run.sh (R/timings.jsonl, the latest run of each step):", "",
              "| step | seconds |", "|---|---|"]
        L += [f"| {t['step']} | {t['seconds']} |" for t in m["timings"]]
    n_ex = sum(line.startswith("**") for line in examples)
    L += ["", f"## 4. {n_ex} test samples: base vs aligned explanations", ""]
    L += examples or ["no test sample has both base and aligned explanations yet"]
    return "\n".join(L) + "\n"


def examples_md(test, items, texts_base, texts_al, p_base, p_al, n, seed) -> list:
    both = sorted(set(texts_base or {}) & set(texts_al or {}))
    rng = np.random.default_rng(seed)
    pools = [rng.permutation([i for i in both if test[i]["label"] == lab]).tolist() for lab in (1, 0)]
    pick = []
    while len(pick) < n and any(pools):  # [ours] alternate clicks and non-clicks
        for pool in pools:
            if pool and len(pick) < n:
                pick.append(pool.pop())
    pick.sort()
    clean = lambda t: " ".join(t.split()).replace("|", "/")
    out = []
    for k, i in enumerate(pick, 1):
        s = test[i]
        title = items.get(s["iid"], {}).get("title", f"item {s['iid']}")
        pb = fmt(p_base[i], 3) if p_base is not None else "n/a"
        pa = fmt(p_al[i], 3) if p_al is not None else "n/a"
        out += [f"**{k}. user {s['uid']} / {title} (iid {s['iid']}) - label {s['label']}**, "
                f"posthoc p = {pb}, ExpCTR-LLM p = {pa}", "",
                f"- base: {clean(texts_base[i])}", f"- aligned: {clean(texts_al[i])}", ""]
    return out


def jsonable(x):
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return None if not math.isfinite(x) else round(float(x), 6)
    if isinstance(x, np.integer):
        return int(x)
    return x


# ---- plumbing: main ------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    paths, R = RunPaths(args.run_dir), str(args.run_dir).rstrip("/")
    test = common.load_split(paths, "test")
    opt = lambda f, fn: fn(f) if f.exists() else None
    train = opt(paths.split("train"), lambda f: common.read_jsonl(f, common.SAMPLE_FIELDS))
    valid = opt(paths.split("valid"), lambda f: common.read_jsonl(f, common.SAMPLE_FIELDS))
    items = common.load_items(paths) if paths.items.exists() else {}
    meta = opt(paths.meta, common.read_json) or {}
    run_info = opt(paths.root / "run.json", common.read_json) or {}
    final, aug, main_bb = resolve_tags(paths, args, run_info)
    spec = variant_specs(R, paths, final, aug, main_bb)

    ctr, sig, mask, P, y, notes = ctr_table(paths, test, train, spec, args)
    if train is None:
        notes.append(f"no data/train.jsonl: popularity needs `python data_prep.py --run-dir {R}`")
    expl, texts = {}, {}
    for src, tag in (("base", "base"), ("aligned", final)):
        expl[src], texts[src] = explanation_table(paths, R, test, valid, items, tag, args)
    expl["echo"] = echo_table(test, valid, items, args)
    ppo = ppo_curve(paths)
    probe, probe_const, probe_notes = probe_curve(paths, train, args)
    cause = cause_choice(test, items, texts, args) if items else {}

    m = {"run_name": paths.root.resolve().name, "run_dir": R,
         "dataset": meta.get("dataset") or run_info.get("dataset") or "unknown",
         "n_test": len(test), "n_common": int(mask.sum()) if P else 0,
         "pos_rate": float(np.mean([s["label"] for s in test])), "final_tag": final, "aug": aug,
         "main_backbone": main_bb, "n_boot": args.n_boot, "seed": args.seed,
         "min_title_chars": args.min_title_chars, "oracle_test_auc": meta.get("oracle_test_auc"),
         "ctr": ctr, "significance": sig, "explanations": expl, "ppo": ppo, "probe": probe,
         "probe_constant": probe_const, "probe_notes": probe_notes, "timings": step_timings(paths),
         "cause_choice": cause,
         "notes": notes}
    paths.eval.mkdir(parents=True, exist_ok=True)
    shown = {k: P[k] for k in table_rows(ctr, main_bb) if k in P}  # id_ctr once
    plots = [] if args.no_plots else make_plots(paths.eval, y, shown, ppo, probe, probe_const)
    plot_note = ("--no-plots" if args.no_plots else "no variant and no PPO rows to plot"
                 if not P and not ppo and not probe else "matplotlib is not installed")
    m["plots"], m["plots_skipped"] = plots, None if plots else plot_note
    sc = lambda tag: opt(paths.scorer / f"preds_test_{tag}.jsonl", lambda f: read_preds(f, test)["p"])
    ex = examples_md(test, items, texts["base"], texts["aligned"], sc("base"),
                     sc(final) if final else None, args.n_examples, args.seed)
    m = jsonable(m)
    common.write_json(paths.eval / "metrics.json", m)
    with common.atomic_path(paths.eval / "report.md") as tmp:
        tmp.write_text(report_md(m, ex, plots, plot_note, ppo), encoding="utf-8")
    common.log_metrics(paths.metrics, stage="evaluate", n_common=m["n_common"],
                       **{f"auc_{k}": v["auc"] for k, v in m["ctr"].items() if v["auc"] is not None})
    print(text_table(m["ctr"], main_bb))
    for k in table_rows(m["ctr"], main_bb):
        if m["ctr"][k]["status"] != "ok":
            print(f"  {k}: not run -> {m['ctr'][k]['produce']}")
    print(f"[evaluate] wrote {paths.eval / 'metrics.json'}, {paths.eval / 'report.md'}"
          + (f", {len(plots)} plots" if plots else f" (plots skipped: {plot_note})"))
    return m


if __name__ == "__main__":
    common.cli(main)
