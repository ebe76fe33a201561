"""evaluate.py: each metric on hand-made inputs with known answers, the report with and without
matplotlib, a run folder with missing stages, and the metrics.json keys of the smoke run."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

import common
import evaluate as ev
import explanation_quality as eq
from common import ExpCTRError

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ["popularity", "id_ctr", "id_ctr_deepfm", "id_ctr_dcnv2", "id_ctr_din", "logreg",
            "llm_ctr", "posthoc", "expctr_llm", "expctr_aug", "expctr_aug_final"]
EXPL_KEYS = ["shuffle_auc_drop", "probe_auc", "stance_agreement", "stance_clear", "grounding",
             "hallucination", "distinct_1", "distinct_2", "usr", "mean_words", "cause_recall"]


# ---- hand-made run folders (layout: common.RunPaths) -------------------------------------------------
GENRES = ["Comedy", "Drama", "Action", "Horror", "Romance", "Sci-Fi"]
WORDS = ["Silent", "Crimson", "Hidden", "Golden", "Velvet", "Harbor", "Garden", "Empire",
         "Letter", "Mountain"]


def make_run(root: Path, stages=("ctr", "scorer", "expl", "aug", "rl"), cause=True, seed=0,
             n_users=25, per_user=8) -> Path:
    rng = np.random.default_rng(seed)
    items = [{"iid": str(i), "title": f"The {WORDS[i % 10]} {WORDS[(i // 10) % 10]} {i} (1990)",
              "genres": [GENRES[i % len(GENRES)]]} for i in range(60)]
    titles = {it["iid"]: eq.title_key(it["title"]) for it in items}

    def samples(n_per, t0):
        out = []
        for u in range(n_users):
            for k in range(n_per):
                iid = str(rng.integers(60))
                s = {"uid": f"u{u}", "iid": iid, "label": int(rng.random() < 0.4), "ts": t0 + k,
                     "hist": [[str(rng.integers(60)), int(rng.random() < 0.5)] for _ in range(3)]}
                if cause:
                    s["cause"] = items[int(iid)]["genres"][0]
                out.append(s)
        return out

    data = {"train": samples(per_user, 0), "valid": samples(2, 100), "test": samples(per_user, 200)}
    for split, rows in data.items():
        common.write_jsonl(root / "data" / f"{split}.jsonl", rows)
    common.write_jsonl(root / "data" / "items.jsonl", items)
    common.write_json(root / "data" / "meta.json", {"dataset": "handmade"})
    test = data["test"]
    y = np.array([s["label"] for s in test])
    sig = lambda x: 1 / (1 + np.exp(-x))

    def preds(path, strength, shuffled=None):
        p = sig(strength * (2 * y - 1) + rng.normal(0, 1, len(y)))
        rows = [{"uid": s["uid"], "iid": s["iid"], "label": s["label"], "p": float(q)}
                for s, q in zip(test, p)]
        if shuffled is not None:
            ps = sig(shuffled * (2 * y - 1) + rng.normal(0, 1, len(y)))
            for r, q in zip(rows, ps):
                r["p_shuffled"] = None if shuffled < 0 else float(q)
        common.write_jsonl(path, rows)

    if "ctr" in stages:
        preds(root / "ctr" / "din" / "preds_test.jsonl", 0.8)
        preds(root / "ctr" / "deepfm" / "preds_test.jsonl", 0.6)
    if "aug" in stages:
        preds(root / "ctr" / "aug_din_iter_1" / "preds_test.jsonl", 2.0)
    if "scorer" in stages:
        preds(root / "scorer" / "preds_test_none.jsonl", 0.5, shuffled=-1)
        preds(root / "scorer" / "preds_test_base.jsonl", 0.5, shuffled=0.5)
        preds(root / "scorer" / "preds_test_iter_2.jsonl", 2.5, shuffled=0.3)
    if "expl" in stages:
        for tag, good in (("base", False), ("iter_2", True)):
            for split in ("valid", "test"):
                rows = []
                for s in data[split]:
                    t = " ".join(titles[s["iid"]]).title()
                    h = " ".join(titles[s["hist"][0][0]]).title()
                    g = items[int(s["iid"])]["genres"][0]
                    text = (f"The user will {'enjoy' if s['label'] else 'not enjoy'} {t}, a {g} "
                            f"film, because they liked {h}." if good else
                            f"The user may watch this movie {rng.integers(5)}.")
                    rows.append({"uid": s["uid"], "iid": s["iid"], "label": s["label"],
                                 "prompt": "...", "explanation": text, "n_tokens": 12})
                common.write_jsonl(root / "explanations" / tag / f"{split}.jsonl", rows)
    if "rl" in stages:
        for k in (1, 2):
            common.log_metrics(root / "metrics.jsonl", stage="stage3_rl", iter=k,
                               phase="lc" if k == 1 else "ic", reward=-0.7 + 0.1 * k,
                               r_lc=-0.6 + 0.1 * k, r_ic=None if k == 1 else -0.5, kl=0.01 * k,
                               clip_frac=0.1, entropy=1.0, expl_len=20, tokens_per_s=5.0)
        common.write_json(root / "run.json", {"preset": "test", "final_tag": "iter_2",
                                              "aug": "aug_din_iter_1"})
    return root


def run_eval(root: Path, *extra) -> dict:
    ev.main(["--run-dir", str(root), "--n-boot", "200", *extra])
    return json.loads((root / "eval" / "metrics.json").read_text())


# ---- CTR metrics -------------------------------------------------------------------------------
def test_auc_perfect_and_reversed():
    y, p = [0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]
    assert ev.auc(y, p) == 1.0
    assert ev.auc(y, p[::-1]) == 0.0
    assert math.isnan(ev.auc([1, 1], [0.2, 0.3]))


def test_logloss_and_gauc_known_values():
    assert ev.logloss([0, 1, 1, 0], [0.5] * 4) == pytest.approx(math.log(2))
    # user a: 4 samples ranked perfectly; user b: 2 samples reversed; user c: one class (dropped)
    y = [0, 0, 1, 1, 1, 0, 1, 1]
    p = [0.1, 0.2, 0.8, 0.9, 0.1, 0.9, 0.5, 0.6]
    uids = ["a"] * 4 + ["b"] * 2 + ["c"] * 2
    assert ev.gauc(y, p, uids) == pytest.approx((4 * 1 + 2 * 0) / 6)


def test_vectorised_bootstrap_auc_equals_sklearn_on_each_resample():
    rng = np.random.default_rng(1)
    y = (rng.random(120) < 0.4).astype(int)
    p = np.round(rng.random(120), 1)  # many ties
    idx = rng.integers(0, 120, size=(5, 120))
    W = np.stack([np.bincount(r, minlength=120) for r in idx])
    got = ev.weighted_auc(y, p, W)
    want = [roc_auc_score(y[r], p[r]) for r in idx]
    assert np.allclose(got, want)


def test_bootstrap_ci_and_paired_p_value():
    rng = np.random.default_rng(2)
    y = (rng.random(300) < 0.4).astype(int)
    good = y + rng.normal(0, 0.6, 300)
    bad = rng.random(300)
    boot = ev.bootstrap_aucs(y, {"good": good, "bad": bad, "same": good}, 500, seed=0)
    for k, p in (("good", good), ("bad", bad)):
        lo, hi = ev.percentile_ci(boot[k])
        assert lo < ev.auc(y, p) < hi
    assert ev.paired_p_value(boot["good"], boot["bad"]) < 0.01
    assert ev.paired_p_value(boot["bad"], boot["good"]) > 0.99
    assert ev.paired_p_value(boot["good"], boot["same"]) > 0.5  # identical models
    again = ev.bootstrap_aucs(y, {"good": good}, 500, seed=0)["good"]
    assert np.array_equal(again, boot["good"])  # seeded


# ---- explanation metrics --------------------------------------------------------------------------
def test_probe_on_text_that_spells_the_label():
    rng = np.random.default_rng(3)
    filler = ["film", "story", "plot", "cast", "music", "scene"]
    make = lambda n: [(int(rng.random() < 0.5), " ".join(rng.choice(filler, 4))) for _ in range(n)]
    tr, te = make(80), make(60)
    text = lambda lab, f: f"{f} the user will {'adore' if lab else 'detest'} it {f}"
    got = eq.probe_auc([text(l, f) for l, f in tr], [l for l, _ in tr],
                       [text(l, f) for l, f in te], [l for l, _ in te])
    assert got > 0.99


def test_distinct_n_usr_exact_fractions():
    texts = ["a b a", "a b c"]
    assert eq.distinct_n(texts, 1) == 3 / 6
    assert eq.distinct_n(texts, 2) == 3 / 4
    assert eq.usr(["Hello world.", "hello   world", "Other one"]) == 2 / 3
    assert eq.usr(["x", "y"]) == 1.0


@pytest.mark.parametrize("text, want", [
    ("The user will enjoy Heat.", 1),
    ("The user will love this film.", 1),
    ("The user would dislike it.", -1),
    ("The user will not enjoy Heat.", -1),
    ("The user won't like this movie.", -1),
    ("The user wouldn’t enjoy it.", -1),
    ("The user is unlikely to like Heat.", -1),
    ("The user is likely to enjoy it.", 1),
    ("The user will probably not be interested in it.", -1),
    ("It is a poor fit for this user.", -1),
    ("Although they liked Heat, the user will not like this film.", -1),
    ("The user, who disliked Heat, will enjoy Toy Story.", 1),
    ("The user watched films like Heat.", 0),
    ("This is a thriller from 1995.", 0),
])
def test_stance_rules(text, want):
    assert eq.stance(text) == want


def grounder():
    items = {"1": {"iid": "1", "title": "Toy Story (1995)", "genres": ["Animation", "Comedy"]},
             "2": {"iid": "2", "title": "Usual Suspects, The (1995)", "genres": ["Crime"]},
             "3": {"iid": "3", "title": "Heat (1995)", "genres": ["Action"]},
             "4": {"iid": "4", "title": "Star Wars (1977)", "genres": ["Sci-Fi", "War"]},
             "5": {"iid": "5", "title": "Sense and Sensibility (1995)", "genres": ["Romance"]},
             "6": {"iid": "6", "title": "Toy Story 2 (1999)", "genres": ["Animation"]},
             "7": {"iid": "7", "title": "Platoon (1986)", "genres": ["War"]}}
    return eq.Grounder(items, min_title_chars=8, min_ground_chars=4)


@pytest.mark.parametrize("iid, hist, text, target, history, genre, halluc", [
    ("1", ["2", "3"], "The user will love Toy Story.", True, False, False, False),
    ("1", ["2", "3"], "They liked The Usual Suspects, so yes.", False, True, False, False),
    ("1", ["2", "3"], "A fan of animated comedies will enjoy it.", False, False, True, False),
    ("1", ["2", "3"], "The user will enjoy it as much as Star Wars.", False, False, False, True),
    ("1", ["2", "3"], "The user will feel the heat.", False, True, False, False),  # 'Heat' is history
    ("1", ["2"], "The user will feel the heat.", False, False, False, False),  # short title: no halluc
    ("1", ["2"], "Sense and Sensibility fans will like Toy Story.", True, False, False, True),
    ("1", ["6"], "They loved Toy Story 2, so yes.", False, True, False, False),  # 'Toy Story' inside
    ("6", ["2"], "Fans of Toy Story will like it.", False, False, False, True),
    ("3", ["7"], "They will enjoy it, like Star Wars.", False, False, False, True),  # 'Wars' != War
    ("3", ["7"], "A war film fan will like it.", False, False, True, False),
])
def test_grounding_and_hallucination(iid, hist, text, target, history, genre, halluc):
    got = grounder().check({"iid": iid, "hist": [[h, 1] for h in hist]}, text)
    assert (got["target"], got["history"], got["genre"], got["halluc"]) == \
        (target, history, genre, halluc)


def test_cause_recall_and_title_normalisation():
    g = grounder()
    s = {"iid": "1", "hist": [], "cause": "Comedy"}
    assert g.check(s, "They love comedies.")["cause"] is True
    assert g.check(s, "A dramatic story.")["cause"] is False
    assert g.check({"iid": "1", "hist": []}, "comedy")["cause"] is None
    assert g.check({"iid": "1", "hist": [], "cause": "Sci-Fi"}, "a science fiction fan")["cause"]
    assert eq.title_key("Usual Suspects, The (1995)") == ("usual", "suspects")
    assert eq.title_key("A Bug's Life (1998)") == ("bug", "s", "life")
    assert eq.title_key("City of Lost Children, The (Cité des enfants perdus, La) (1995)") == \
        ("city", "of", "lost", "children")


def test_cause_choice_needs_the_cause_alone_and_echo_baselines():
    """A hit names the cause and no other genre of the target: restating every genre is never a
    hit (the prompt echo), picking the right one is."""
    items = {"1": {"iid": "1", "title": "Toy Story (1995)", "genres": ["Animation", "Comedy"]},
             "2": {"iid": "2", "title": "Heat (1995)", "genres": ["Action", "Crime"]},
             "3": {"iid": "3", "title": "Platoon (1986)", "genres": ["War"]}}
    test = [{"uid": "u", "iid": "1", "label": 1, "hist": [], "cause": "Comedy"},
            {"uid": "u", "iid": "2", "label": 0, "hist": [], "cause": "Crime"},
            {"uid": "u", "iid": "3", "label": 0, "hist": [], "cause": "War"}]  # 1 genre: not counted
    texts = {"base": {0: "An animated comedy, so yes.", 1: "They dislike crime films.", 2: "x"},
             "aligned": {0: "They love comedies.", 1: "They dislike crime films.", 2: "x"}}
    args = type("A", (), {"min_title_chars": 8, "min_ground_chars": 4, "seed": 0, "n_boot": 200})
    cc = eq.cause_choice(test, items, texts, args)
    assert cc["n"] == 2
    assert cc["base"]["cause_hit"] == 0.5 and cc["base"]["wrong_genre"] == 0.5
    assert cc["aligned"]["cause_hit"] == 1.0 and cc["aligned"]["wrong_genre"] == 0.0
    assert cc["echo_all_genres"]["cause_hit"] == 0.0 and cc["echo_all_genres"]["wrong_genre"] == 1.0
    assert cc["echo_first_genre"]["cause_hit"] == 0.0  # Animation / Action come first
    assert cc["aligned_minus_base"]["delta"] == 0.5


def test_cause_choice_script_scores_a_split_from_the_run_folder_and_refuses_other_rows(tmp_path, capsys):
    """scripts/cause_choice.py reads R/data/<split>.jsonl and both tags' explanations of it and
    gives explanation_quality.cause_choice's table; explanations of other samples are refused."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("cause_choice", ROOT / "scripts" / "cause_choice.py")
    cs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cs)
    items = [{"iid": "1", "title": "Toy Story (1995)", "genres": ["Animation", "Comedy"]},
             {"iid": "2", "title": "Heat (1995)", "genres": ["Action", "Crime"]}]
    valid = [{"uid": "u", "iid": "1", "label": 1, "ts": 1, "hist": [], "cause": "Comedy"},
             {"uid": "v", "iid": "2", "label": 0, "ts": 2, "hist": [], "cause": "Crime"}]
    (tmp_path / "data").mkdir()
    common.write_jsonl(tmp_path / "data" / "items.jsonl", items)
    common.write_jsonl(tmp_path / "data" / "valid.jsonl", valid)
    for tag, texts in (("base", ["An animated comedy.", "A crime film."]),
                       ("iter_2", ["They love comedies.", "They dislike crime films."])):
        (tmp_path / "explanations" / tag).mkdir(parents=True)
        common.write_jsonl(tmp_path / "explanations" / tag / "valid.jsonl",
                           [dict(s, explanation=t) for s, t in zip(valid, texts)])
    cc = cs.main(["--run-dir", str(tmp_path), "--aligned", "iter_2", "--n-boot", "50"])
    assert cc["n"] == 2 and cc["base"]["cause_hit"] == 0.5 and cc["aligned"]["cause_hit"] == 1.0
    assert cc["base"]["wrong_genre"] == 0.5 and cc["aligned_minus_base"]["delta"] == 0.5
    assert "| aligned | 1.0000" in capsys.readouterr().out
    common.write_jsonl(tmp_path / "explanations" / "iter_2" / "valid.jsonl",
                       [dict(s, explanation="x") for s in valid[::-1]])
    with pytest.raises(common.ExpCTRError, match="is not row-aligned with"):
        cs.main(["--run-dir", str(tmp_path), "--aligned", "iter_2"])


def test_shuffle_drop_averages_permutations_and_their_spread_widens_the_ci():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    p = np.clip(y * 0.3 + rng.random(400) * 0.7, 0, 1)
    same = ev.shuffle_drop(y, p, np.stack([p] * 5), 300, 0)
    assert same["shuffle_auc_drop"] == 0 and np.allclose(same["shuffle_auc_drop_ci"], 0, atol=1e-12)
    sh = np.stack([rng.permutation(p) for _ in range(5)])
    d = ev.shuffle_drop(y, p, sh, 300, 0)
    want = ev.auc(y, p) - np.mean([ev.auc(y, x) for x in sh])
    assert abs(d["shuffle_auc_drop"] - want) < 1e-12 and d["n_shuffles"] == 5
    assert d["shuffle_auc_drop_ci"][0] > 0 and d["shuffle_auc_drop_p"] < 0.05
    # one permutation that happens to keep the signal: the spread shows up in the CI
    mixed = np.concatenate([sh[:4], p[None]])
    lo, hi = ev.shuffle_drop(y, p, mixed, 300, 0)["shuffle_auc_drop_ci"]
    lo4, hi4 = ev.shuffle_drop(y, p, sh[:4], 300, 0)["shuffle_auc_drop_ci"]
    assert hi - lo > hi4 - lo4


def test_prompt_echo_is_grounded_by_construction():
    g = grounder()
    g_items = {"1": {"iid": "1", "title": "Toy Story (1995)", "genres": ["Animation", "Comedy"]}}
    c = g.check({"iid": "1", "hist": [], "cause": "Comedy"}, eq.prompt_echo({"iid": "1"}, g_items))
    assert c["target"] and c["genre"] and c["cause"]


# ---- whole run folders ------------------------------------------------------------------------------
def test_full_report_with_plots(tmp_path, capsys):
    root = make_run(tmp_path / "run")
    m = run_eval(root)
    out = capsys.readouterr().out
    for name in ("roc.png", "calibration.png", "ppo.png"):
        f = root / "eval" / name
        assert f.exists() and f.read_bytes()[:4] == b"\x89PNG", name
    rep = (root / "eval" / "report.md").read_text()
    assert "## 1. CTR accuracy" in rep and "## 2. Explanation quality" in rep
    assert "![roc.png](roc.png)" in rep and "Plots skipped" not in rep
    assert rep.count("- base: ") == 10 and rep.count("- aligned: ") == 10
    assert "variant" in out and "expctr_aug" in out and "AUC [95% CI]" in out
    n = len(common.read_jsonl(root / "data" / "test.jsonl"))
    for v in ("popularity", "id_ctr", "id_ctr_din", "id_ctr_deepfm", "llm_ctr", "posthoc",
              "expctr_llm", "expctr_aug"):
        r = m["ctr"][v]
        assert r["status"] == "ok" and r["n"] == n, v
        assert r["auc_ci"][0] <= r["auc"] <= r["auc_ci"][1]
    assert m["ctr"]["id_ctr"]["auc"] == m["ctr"]["id_ctr_din"]["auc"]
    assert m["ctr"]["id_ctr_dcnv2"]["status"] == "not run" and m["ctr"]["id_ctr_dcnv2"]["auc"] is None
    assert m["final_tag"] == "iter_2" and m["aug"] == "aug_din_iter_1"
    # built so that the aligned scorer and the Aug model are clearly better
    assert m["significance"]["expctr_llm_vs_posthoc"]["p_value"] < 0.05
    assert m["significance"]["expctr_aug_vs_id_ctr"]["p_value"] < 0.05
    al, base = m["explanations"]["aligned"], m["explanations"]["base"]
    assert al["shuffle_auc_drop"] > 0.2 and al["probe_auc"] > 0.95 and base["probe_auc"] < 0.8
    assert al["stance_clear"] == 1.0 and base["stance_clear"] == 0.0
    assert al["stance_label_agreement"] == 1.0 and al["grounding_target"] == 1.0
    assert al["cause_recall"] == 1.0 and base["cause_recall"] == 0.0
    assert al["usr"] > base["usr"] and 0 < al["distinct_2"] <= 1
    assert [r["iter"] for r in m["ppo"]] == [1, 2]
    rows = [r for r in common.read_jsonl(root / "metrics.jsonl") if r["stage"] == "evaluate"]
    assert rows and rows[-1]["auc_expctr_aug"] == m["ctr"]["expctr_aug"]["auc"]


def test_report_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` -> ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    root = make_run(tmp_path / "run", cause=False)
    m = run_eval(root)
    assert not list((root / "eval").glob("*.png"))
    rep = (root / "eval" / "report.md").read_text()
    assert "Plots skipped: matplotlib is not installed" in rep
    assert "| expctr_llm |" in rep and "| shuffle_auc_drop |" in rep
    assert m["plots"] == [] and m["plots_skipped"]
    assert m["explanations"]["aligned"]["cause_recall"] is None  # no "cause" in the data


def test_missing_stages_give_not_run_rows(tmp_path, capsys):
    root = make_run(tmp_path / "run", stages=("ctr",))
    m = run_eval(root, "--no-plots")
    out = capsys.readouterr().out
    rep = (root / "eval" / "report.md").read_text()
    for v in VARIANTS:
        assert set(m["ctr"][v]) >= {"auc", "auc_ci", "logloss", "gauc", "n"}
    for v in ("llm_ctr", "posthoc", "expctr_llm", "expctr_aug", "logreg"):
        assert m["ctr"][v]["status"] == "not run" and m["ctr"][v]["auc"] is None
        assert f"| {v} |" in rep and "not run" in rep
    cmd = f"python stage1_sft.py --run-dir {root} --predict none --split test"
    assert cmd in rep and cmd in out
    assert m["ctr"]["popularity"]["status"] == "ok"  # computed from data/train.jsonl
    assert m["ctr"]["id_ctr"]["status"] == "ok"
    for src in ("base", "aligned"):
        assert m["explanations"][src]["status"] == "not run"
        assert all(m["explanations"][src][k] is None for k in EXPL_KEYS)
    assert m["significance"]["expctr_llm_vs_posthoc"]["p_value"] is None
    assert "Plots skipped: --no-plots" in rep


def test_partial_coverage_restricts_to_intersection_and_label_mismatch_fails(tmp_path):
    root = make_run(tmp_path / "run", stages=("ctr",))
    f = root / "ctr" / "deepfm" / "preds_test.jsonl"
    rows = common.read_jsonl(f)
    common.write_jsonl(f, rows[:50])
    m = run_eval(root, "--no-plots")
    assert m["ctr"]["id_ctr_din"]["n"] == 50 and m["n_common"] == 50
    assert any("intersection" in n for n in m["notes"])
    rows[3]["label"] = 1 - rows[3]["label"]
    common.write_jsonl(f, rows)
    with pytest.raises(ExpCTRError, match="label"):
        run_eval(root, "--no-plots")


def test_cli_error_line_and_no_torch_import(tmp_path):
    py = sys.executable
    r = subprocess.run([py, "-c", "import sys, evaluate; "
                        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr
    r = subprocess.run([py, "evaluate.py", "--run-dir", str(tmp_path / "nope")], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error:") and "data_prep.py" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# ---- the smoke run (fixture from tests/conftest.py: ./run.sh --preset smoke once) -------------
def test_smoke_run_metrics_have_every_key(smoke_run_dir):
    f = Path(smoke_run_dir) / "eval" / "metrics.json"
    assert f.exists(), "run.sh --preset smoke should end with `python evaluate.py --run-dir R`"
    m = json.loads(f.read_text())
    for v in VARIANTS:
        assert set(m["ctr"][v]) >= {"auc", "auc_ci", "logloss", "gauc", "n"}, v
    for v in ("popularity", "id_ctr", "llm_ctr", "posthoc", "expctr_llm", "expctr_aug",
              "expctr_aug_final"):
        assert m["ctr"][v]["auc"] is not None, f"{v}: {m['ctr'][v].get('produce')}"
    for pair in ("expctr_llm_vs_posthoc", "expctr_aug_vs_id_ctr", "expctr_aug_final_vs_id_ctr"):
        assert m["significance"][pair]["p_value"] is not None
    # the reward probe: one row per policy (base and every PPO iteration), a CI each, a constant
    info = json.loads((Path(smoke_run_dir) / "run.json").read_text())
    n_iter = int(info["final_tag"].split("_")[1])
    assert [r["tag"] for r in m["probe"]] == ["base"] + [f"iter_{k}" for k in range(1, n_iter + 1)]
    for r in m["probe"]:
        assert r["r_lc_ci"][0] <= r["r_lc"] <= r["r_lc_ci"][1] and r["n"] == r["n_prompts"] * 4
    assert m["probe_constant"]["r_lc"] < 0 and not m["probe_notes"]
    assert [r["iter"] for r in m["ppo"]] == list(range(1, n_iter + 1))
    assert all(abs(r["ratio_first_step"] - 1) < 1e-5 for r in m["ppo"])
    for src in ("base", "aligned"):
        assert set(m["explanations"][src]) >= set(EXPL_KEYS), src
        assert m["explanations"][src]["status"] == "ok"
    assert (Path(smoke_run_dir) / "eval" / "report.md").exists()


@pytest.mark.parametrize("text, invented", [
    ("The user would view Toy Story as a comedy.", False),           # catalogue title
    ("They liked The Usual Suspects and Toy Story 2.", False),        # catalogue titles
    ("Fans of Sense and Sensibility will like it.", False),          # function word inside
    ("The user would like the Lost City of the Ancients.", True),    # no such title
    ("A fan of Crime and Romance films will enjoy it.", False),      # genre words only
    ("The user would view it as a Star Wars Holiday Special.", False),  # contains a title
    ("The user loved Midnight Harbor.", True),
    ("The user will enjoy it.", False),                              # one capitalised word
])
def test_invented_titles_are_title_like_spans_matching_no_catalogue_title(text, invented):
    assert grounder().check({"iid": "1", "hist": []}, text)["invented"] is invented


def test_compare_probes_pairs_two_policies_as_the_probe_curve_does(tmp_path, capsys):
    """scripts/compare_probes.py (policy A vs B on the same probe prompts, possibly from two run
    folders) gives the probe curve's paired Δ, CI and p on the same resamples, and refuses files
    whose prompts or labels differ."""
    import argparse
    import importlib.util
    spec = importlib.util.spec_from_file_location("compare_probes", ROOT / "scripts" / "compare_probes.py")
    cp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cp)
    rng = np.random.default_rng(3)
    (tmp_path / "probe").mkdir()
    rows = [{"uid": str(g), "iid": str(100 + g), "group": g, "label": int(g % 2), "kl_ref": 0.0}
            for g in range(12) for _ in range(4)]
    for tag, shift in (("base", 0.0), ("iter_1", 0.05)):
        common.write_jsonl(tmp_path / "probe" / f"{tag}.jsonl",
                           [dict(r, r_lc=float(-0.7 + shift + rng.normal(0, 0.2))) for r in rows])
    curve, _, notes = ev.probe_curve(common.RunPaths(tmp_path), [], argparse.Namespace(n_boot=300, seed=0))
    assert not notes
    # the scorer's AUC over the probe samples: P(Yes) recovered from r_LC = log P(truth)
    from sklearn.metrics import roc_auc_score
    for r, tag in zip(curve, ("base", "iter_1")):
        got = common.read_jsonl(tmp_path / "probe" / f"{tag}.jsonl")
        y = np.array([g["label"] for g in got])
        pt = np.exp([g["r_lc"] for g in got])
        assert r["auc"] == pytest.approx(roc_auc_score(y, np.where(y == 1, pt, 1 - pt)), abs=1e-12)
        assert r["auc_ci"][0] < r["auc"] < r["auc_ci"][1]
    cp.main(["--a", str(tmp_path / "probe" / "iter_1.jsonl"), "--b", str(tmp_path / "probe" / "base.jsonl"),
             "--n-boot", "300", "--seed", "0"])
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("| A - B"))
    d, lo, hi = curve[1]["delta"], *curve[1]["delta_ci"]
    assert line == f"| A - B | {d:+.4f} [{lo:+.4f}, {hi:+.4f}] | {curve[1]['p_value']:.4f} |"
    common.write_jsonl(tmp_path / "other.jsonl", [dict(r, r_lc=-0.7, label=1 - r["label"]) for r in rows])
    with pytest.raises(common.ExpCTRError, match="other prompts, labels or groups"):
        cp.main(["--a", str(tmp_path / "probe" / "base.jsonl"), "--b", str(tmp_path / "other.jsonl")])


def test_compare_probes_exclude_leaves_out_the_named_prompts(tmp_path, capsys):
    """--exclude FILE: the comparison on the prompts not in FILE equals the comparison of files
    that never held those prompts."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("compare_probes", ROOT / "scripts" / "compare_probes.py")
    cp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cp)
    rng = np.random.default_rng(4)
    rows = [{"uid": str(g), "iid": str(100 + g), "group": g, "label": int(g % 2), "kl_ref": 0.0}
            for g in range(10) for _ in range(3)]
    old = {1, 4, 5}  # the prompts an earlier probe had shown
    for tag, shift in (("a", 0.3), ("b", 0.0)):
        full = [dict(r, r_lc=float(-0.7 + shift * (r["group"] in old) + rng.normal(0, 0.2))) for r in rows]
        common.write_jsonl(tmp_path / f"{tag}.jsonl", full)
        kept = [r for r in full if r["group"] not in old]
        renum = {g: i for i, g in enumerate(dict.fromkeys(r["group"] for r in kept))}
        common.write_jsonl(tmp_path / f"{tag}_fresh.jsonl", [dict(r, group=renum[r["group"]]) for r in kept])
    common.write_jsonl(tmp_path / "old.jsonl", [{"uid": str(g), "iid": str(100 + g), "ts": 0} for g in old])
    a, b = str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")
    cp.main(["--a", a, "--b", b, "--exclude", str(tmp_path / "old.jsonl")])
    got = [l for l in capsys.readouterr().out.splitlines() if l.startswith("| A - B")]
    cp.main(["--a", str(tmp_path / "a_fresh.jsonl"), "--b", str(tmp_path / "b_fresh.jsonl")])
    want = [l for l in capsys.readouterr().out.splitlines() if l.startswith("| A - B")]
    assert got == want and len(got) == 1
    cp.main(["--a", str(tmp_path / "a.jsonl"), "--b", str(tmp_path / "b.jsonl")])
    assert [l for l in capsys.readouterr().out.splitlines() if l.startswith("| A - B")] != want
    common.write_jsonl(tmp_path / "none.jsonl", [{"uid": "x", "iid": "y"}])
    with pytest.raises(common.ExpCTRError, match="nothing left out"):
        cp.main(["--a", a, "--b", b, "--exclude", str(tmp_path / "none.jsonl")])


def test_probe_curve_leaves_out_a_policy_probed_on_other_prompts_and_says_how_to_redo_it(tmp_path):
    import argparse
    (tmp_path / "probe").mkdir()
    rows = [{"uid": str(g), "iid": str(100 + g), "group": g, "label": 1, "r_lc": -0.5, "kl_ref": 0.0}
            for g in range(3) for _ in range(2)]
    common.write_jsonl(tmp_path / "probe" / "base.jsonl", rows)
    common.write_jsonl(tmp_path / "probe" / "iter_1.jsonl", [dict(r, iid="7") for r in rows])
    curve, _, notes = ev.probe_curve(common.RunPaths(tmp_path), [], argparse.Namespace(n_boot=50, seed=0))
    assert [r["tag"] for r in curve] == ["base"]
    assert len(notes) == 1 and "rerun with --probe iter_1 --force" in notes[0]
