"""Explanation quality without ground-truth explanations (PAPER_NOTES.md, last section): the text
metrics evaluate.py reports for every explainer, side by side with the prompt-echo baseline.

What is here (pure functions of text, the catalogue and the samples; no model, no run folder):
  distinct_n, usr          diversity of a corpus of explanations
  stance                   the explanation's predicted attitude (+1 will like, -1 will not, 0 unclear),
                           by the rules STANCE_RULES lists (printed verbatim in every report)
  Grounder                 which titles and genres an explanation names: the target, history items,
                           other catalogue titles (hallucination), title-like spans matching no
                           title (invented)
  cause_choice             planted world: does the explanation name the click's cause genre alone
  probe_auc                how much of the label a TF-IDF + logistic-regression probe reads from text
  prompt_echo              the baseline "explanation" that restates the target and its genres
All rules here are [ours]: the paper evaluates explanations with LLM judges and user studies.
"""
from __future__ import annotations

import re
import unicodedata
from collections import defaultdict

import numpy as np

from metrics import auc, percentile_ci


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


# [ours] title lengths (normalised characters) below which a catalogue title is not checked for
# hallucination (ordinary words), and a target/history title does not count for grounding:
# the defaults of evaluate.py and of every script that applies its rules
MIN_TITLE_CHARS, MIN_GROUND_CHARS = 8, 4

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


def choice_targets(samples: list[dict], items: dict) -> list[int]:
    """Positions of the samples whose target has a planted cause and >= 2 genres: where naming the
    cause alone is a real choice (target 5)."""
    return [i for i, s in enumerate(samples) if s.get("cause") and
            len((items.get(s["iid"]) or {}).get("genres", [])) >= 2]


def cause_choice(test, items, texts: dict, args) -> dict:
    """[ours] Does an explanation pick the planted cause among the target's genres? On test
    targets with >= 2 genres (a real choice): hit = names the cause and no other genre of the
    target; wrong = names a genre of the target that is not the cause. Rows: base, aligned and two
    prompt-echo baselines (restating all target genres: hit 0 by construction; restating the
    first listed one: ~1/2 of targets), with 95% bootstrap CIs and paired differences of aligned
    to base and to the best echo on the same resampled targets (p one-sided, H1: aligned higher)."""
    g = Grounder(items, args.min_title_chars, args.min_ground_chars)
    idx = choice_targets(test, items)
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


def prompt_echo(sample: dict, items: dict) -> str:
    """[ours] The prompt-echo baseline: an "explanation" that only restates the target and its
    genres, as an explainer copying its prompt would. Every text metric is also reported for it."""
    it = items.get(sample["iid"]) or {}
    genres = " and ".join(it.get("genres") or []) or "a"
    return f"The user would view {it.get('title', 'the item')} as a {genres} film."


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
