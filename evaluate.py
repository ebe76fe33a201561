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
from collections import defaultdict, deque
from pathlib import Path

import numpy as np
from tqdm import tqdm

import common
from common import ExpCTRError, RunPaths
import explanation_quality as eq
import report
from metrics import auc, gauc, logloss, percentile_ci  # noqa: F401 (defined once; tests read them here too)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", required=True, help="run folder written by the stages (runs/<name>)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for CIs/p-values")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and of the examples")
    p.add_argument("--final-tag", default=None, help="aligned explainer tag (default: R/run.json "
                   "final_tag, else the highest iter_k under explanations/ with test.jsonl)")
    p.add_argument("--aug", default=None, help="ExpCTR-Aug folder under ctr/ (default: R/run.json "
                   "aug, else the ctr/aug_* with the highest iter)")
    p.add_argument("--min-title-chars", type=int, default=eq.MIN_TITLE_CHARS, help="[ours] catalogue titles shorter "
                   "than this (normalised) are not checked for hallucination (ordinary words)")
    p.add_argument("--min-ground-chars", type=int, default=eq.MIN_GROUND_CHARS, help="[ours] target/history titles "
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


def paired_p_value(boot_a, boot_b) -> float:
    """One-sided bootstrap p-value of H1 "a has the higher AUC": (1 + #{AUC_a <= AUC_b}) / (B + 1)
    over the shared resamples (never exactly 0; identical models give 1)."""
    d = boot_a - boot_b
    d = d[np.isfinite(d)]
    return float((1 + (d <= 0).sum()) / (len(d) + 1))


# ---- algorithm: the reward probe, a learning curve on fixed held-out prompts ----------------------
def read_probe(path) -> list:
    """The rows of one probe file (R/probe/<tag>.jsonl), each checked for a numeric group, r_lc and label."""
    rows = common.read_jsonl(path)
    for i, r in enumerate(rows, 1):
        if not all(isinstance(r.get(k), (int, float)) for k in ("group", "r_lc", "label")):
            raise ExpCTRError(f"{path}:{i}: expected numeric 'group', 'r_lc' and 'label'")
    return rows


def prompt_means(rows, vals) -> np.ndarray:
    """The mean of vals (one per row) over each prompt's K samples: one value per probe prompt
    (the rows' 'group'), the unit the probe's bootstrap resamples."""
    g = np.array([r["group"] for r in rows])
    n = int(g.max()) + 1
    return np.bincount(g, np.asarray(vals, float), n) / np.bincount(g, None, n)


def probe_p_yes(rows) -> np.ndarray:
    """The scorer's P(Yes) behind each probe sample: r_LC = log P(truth), so P(Yes) = exp(r_LC)
    for a click and 1 - exp(r_LC) otherwise."""
    lp = np.array([r["r_lc"] for r in rows], float)
    return np.where(np.array([r["label"] for r in rows]) == 1, np.exp(lp), -np.expm1(lp))


def probe_curve(paths: RunPaths, train, args) -> tuple[list, dict | None, list]:
    """Mean r_LC of every policy on R/probe/<tag>.jsonl (the same prompts, K and seed for each),
    with a 95% bootstrap CI over prompts (a prompt's K samples are resampled together), the
    difference to the base policy on the same resamples (paired; one-sided p of "no gain"), the
    mean KL to the reference, and the constant predictor (train positive rate) on the same
    prompts. [ours] Also the scorer's AUC over each policy's probe samples (same resamples): how
    much click ranking its explanations give the scorer. Mean r_LC also rises when explanations
    only make a miscalibrated scorer less confident, with this AUC flat (README, the planted
    world's third draw). Returns (rows, constant row, notes)."""
    files = {f.stem: f for f in (paths.root / "probe").glob("*.jsonl")}
    tags = sorted((t for t in files if t == "base" or re.fullmatch(r"iter_\d+", t)),
                  key=lambda t: -1 if t == "base" else int(t[5:]))
    if not tags:
        return [], None, []
    data, notes = {}, []
    for t in tags:
        data[t] = read_probe(files[t])
    key = lambda rows: [(r["uid"], r["iid"], r["group"]) for r in rows]
    ref = key(data[tags[0]])
    for t in tags[1:]:
        if key(data[t]) != ref:
            notes.append(f"probe/{t}.jsonl has other prompts than probe/{tags[0]}.jsonl: left out "
                         f"(not like with like; rerun with --probe {t} --force)")
            tags.remove(t)
    means = {t: prompt_means(data[t], [r["r_lc"] for r in data[t]]) for t in tags}
    n_groups = len(means[tags[0]])
    rng = np.random.default_rng(args.seed)
    resample = rng.integers(0, n_groups, size=(args.n_boot, n_groups))
    boot = lambda g: g[resample].mean(1)
    counts = np.stack([np.bincount(r, minlength=n_groups) for r in resample])  # [n_boot, groups]
    out = []
    for t in tags:
        g = means[t]
        row = {"tag": t, "iter": 0 if t == "base" else int(t[5:]), "n_prompts": n_groups,
               "n": len(data[t]), "r_lc": float(g.mean()), "r_lc_ci": percentile_ci(boot(g)),
               "kl_ref": float(np.mean([r.get("kl_ref") or 0.0 for r in data[t]]))}
        y, grp = np.array([r["label"] for r in data[t]]), np.array([r["group"] for r in data[t]])
        if 0 < y.sum() < len(y):  # a prompt's K samples enter a resample together
            p_yes = probe_p_yes(data[t])
            row.update(auc=auc(y, p_yes),
                       auc_ci=percentile_ci(weighted_auc(y, p_yes, counts[:, grp])))
        if t != tags[0]:
            ba, bb = boot(g), boot(means[tags[0]])
            row.update(delta=float(g.mean() - means[tags[0]].mean()), delta_ci=percentile_ci(ba - bb),
                       p_value=paired_p_value(ba, bb))
        out.append(row)
    const = None
    if train:
        prior = float(np.mean([s["label"] for s in train]))
        y = np.array([r["label"] for r in data[tags[0]]], float)
        g = prompt_means(data[tags[0]], y * math.log(prior) + (1 - y) * math.log1p(-prior))
        const = {"tag": "constant", "prior": prior, "r_lc": float(g.mean()), "r_lc_ci": percentile_ci(boot(g))}
    return out, const, notes


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
    res.update(status="ok", n=len(texts), distinct_1=eq.distinct_n(texts, 1),
               distinct_2=eq.distinct_n(texts, 2), usr=eq.usr(texts),
               mean_words=float(np.mean([len(t.split()) for t in texts])) if texts else None)
    if valid_pairs:
        res["probe_auc"] = eq.probe_auc([t for t, _ in valid_pairs], [v for _, v in valid_pairs], texts, y)
    st = np.array([eq.stance(t) for t in tqdm(texts, desc=f"stance {tag}", leave=False, mininterval=2)])
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
        g = eq.Grounder(items, args.min_title_chars, args.min_ground_chars)
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
    texts = [eq.prompt_echo(s, items) for s in test]
    pairs = [(eq.prompt_echo(s, items), s["label"]) for s in valid] if valid else None
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
    split_or_none = lambda s: common.load_split(paths, s) if common.has_split(paths, s) else None
    train, valid = split_or_none("train"), split_or_none("valid")
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
    cause = eq.cause_choice(test, items, texts, args) if items else {}

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
    shown = {k: P[k] for k in report.table_rows(ctr, main_bb) if k in P}  # id_ctr once
    plots = [] if args.no_plots else report.make_plots(paths.eval, y, shown, ppo, probe, probe_const)
    plot_note = ("--no-plots" if args.no_plots else "no variant and no PPO rows to plot"
                 if not P and not ppo and not probe else "matplotlib is not installed")
    m["plots"], m["plots_skipped"] = plots, None if plots else plot_note
    sc = lambda tag: opt(paths.scorer / f"preds_test_{tag}.jsonl", lambda f: read_preds(f, test)["p"])
    ex = report.examples_md(test, items, texts["base"], texts["aligned"], sc("base"),
                     sc(final) if final else None, args.n_examples, args.seed)
    m = jsonable(m)
    common.write_json(paths.eval / "metrics.json", m)
    with common.atomic_path(paths.eval / "report.md") as tmp:
        tmp.write_text(report.report_md(m, ex, plots, plot_note, ppo), encoding="utf-8")
    common.log_metrics(paths.metrics, stage="evaluate", n_common=m["n_common"],
                       **{f"auc_{k}": v["auc"] for k, v in m["ctr"].items() if v["auc"] is not None})
    print(report.text_table(m["ctr"], main_bb))
    for k in report.table_rows(m["ctr"], main_bb):
        if m["ctr"][k]["status"] != "ok":
            print(f"  {k}: not run -> {m['ctr'][k]['produce']}")
    print(f"[evaluate] wrote {paths.eval / 'metrics.json'}, {paths.eval / 'report.md'}"
          + (f", {len(plots)} plots" if plots else f" (plots skipped: {plot_note})"))
    return m


if __name__ == "__main__":
    common.cli(main)
