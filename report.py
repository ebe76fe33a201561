"""The run report of evaluate.py: Markdown tables, examples and plots (rendering only).

evaluate.py computes every number into R/eval/metrics.json; this module turns that dictionary
into R/eval/report.md (report_md, examples_md) and R/eval/*.png (make_plots, only when
matplotlib is installed). Nothing here computes a metric.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

import common
from explanation_quality import STANCE_RULES
from metrics import auc


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


# ---- plumbing: report ------------------------------------------------------------------------------
def fmt(x, d=4):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{d}f}"


def cause_choice_md(cc: dict) -> list[str]:
    """Markdown of explanation_quality.cause_choice's result: the table and the paired deltas."""
    L = ["| explanations | cause hit [95% CI] | names a wrong genre |", "|---|---|---|"]
    for k in ("base", "aligned", "echo_all_genres", "echo_first_genre"):
        if k in cc:
            L.append(f"| {k} | {fmt(cc[k]['cause_hit'])} [{fmt(cc[k]['cause_hit_ci'][0])}, "
                     f"{fmt(cc[k]['cause_hit_ci'][1])}] | {fmt(cc[k]['wrong_genre'])} |")
    for k, d in cc.items():
        if k.startswith("aligned_minus_"):
            L.append(f"- {k}: Δ {fmt(d['delta'])} [{fmt(d['ci'][0])}, {fmt(d['ci'][1])}], "
                     f"p = {fmt(d['p_value'])} (paired bootstrap, one-sided)")
    return L


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
              ""] + cause_choice_md(cc)
    L += ["", "## 3. Plots", ""]
    L += [f"![{p}]({p})" for p in plots] or [f"Plots skipped: {plot_note}."]
    L += ["", "**Reward probe** (the learning curve): mean r_LC of each policy on the same held-out "
          "prompts of data/probe.jsonl (never trained on by the scorer, the ID models or the "
          "policy), the same K samples per prompt and the same sampling seed; 95% bootstrap CI "
          "over prompts; Δ = difference to the base policy on the same resamples, p = one-sided "
          "(H1: the policy beats base); KL = mean sequence KL to the reference on these samples; "
          "scorer AUC = the AUC of the scorer's P(Yes) over the policy's probe samples (how much "
          "click ranking its explanations carry; r_LC also rises when they only make the scorer "
          "less confident, with this AUC flat; the constant predictor's is 0.5).", ""]
    if m["probe"]:
        L += ["| policy | n prompts x K | mean r_LC [95% CI] | Δ vs base [95% CI] | p | KL to ref | scorer AUC [95% CI] |",
              "|---|---|---|---|---|---|---|"]
        for r in m["probe"]:
            d = (f"{fmt(r['delta'])} [{fmt(r['delta_ci'][0])}, {fmt(r['delta_ci'][1])}]"
                 if r.get("delta") is not None else "-")
            a = (f"{fmt(r['auc'])} [{fmt(r['auc_ci'][0])}, {fmt(r['auc_ci'][1])}]"
                 if r.get("auc") is not None else "-")
            L.append(f"| {r['tag']} | {r['n_prompts']} x {r['n'] // max(r['n_prompts'], 1)} | "
                     f"{fmt(r['r_lc'])} [{fmt(r['r_lc_ci'][0])}, {fmt(r['r_lc_ci'][1])}] | {d} | "
                     f"{fmt(r.get('p_value'))} | {fmt(r['kl_ref'])} | {a} |")
        c = m["probe_constant"]
        if c:
            L.append(f"| constant predictor (p = {fmt(c['prior'], 3)}, train rate) | same prompts | "
                     f"{fmt(c['r_lc'])} [{fmt(c['r_lc_ci'][0])}, {fmt(c['r_lc_ci'][1])}] | - | - | - | 0.5 |")
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
