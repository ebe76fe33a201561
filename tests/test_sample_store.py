"""The vectorised data path: the same samples as the per-row reference, in JSONL or in the
columnar store, for every loader fixture, the planted world and (when cached) ML-100K."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import data_prep  # noqa: E402
import fixtures_raw as F  # noqa: E402
import readers  # noqa: E402
import reference_samples as REF  # noqa: E402
import sample_store  # noqa: E402

SUBSETS = ["--max-samples", "valid=3", "--max-samples", "rl=2"]


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    d = tmp_path_factory.mktemp("raw")
    return {k: w(d / k) for k, w in F.WRITERS.items()}


def reference(ds, args_list):
    """The per-row reference's splits for the same arguments."""
    a = data_prep.parse_args(["--run-dir", "x", *args_list])
    extras = {}
    if ds == "synthetic":
        inter, items, users, truth = data_prep.make_synthetic(a)
        labels = [truth[x[:2]][0] for x in inter]
        extras = {k: {"cause": truth[x[:2]][1]} for k, x in enumerate(inter)}
    else:
        it, items, users, _ = readers.LOADERS[ds](a)
        if ds == "ml-20m":
            inter = REF.ml20m_tuples(Path(a.raw_dir) / "ratings.csv")
        else:
            inter = [(str(it.users[u]), str(it.items[i]), int(t), None if np.isnan(r) else float(r))
                     for u, i, t, r in zip(it.uid, it.iid, it.ts, it.rating)]
        inter = [x for x in inter if x[1] in items]
        thr = data_prep.DEFAULT_THRESHOLD[ds]
        labels = [int(x[3] >= thr) for x in inter]
    ms = {s: int(n) for s, n in (m.split("=") for m in a.max_samples)}
    return REF.build(inter, labels, users, extras, a.history_len, a.min_history, [0.8, 0.1, 0.1],
                     a.rl_frac, a.probe_frac, a.seed, ms)


def both_forms(tmp_path, args_list):
    """(JSONL run, store run) of the same arguments."""
    out = []
    for name, extra in (("jsonl", []), ("store", ["--jsonl-max-rows", "0"])):
        run = tmp_path / name
        data_prep.main(["--run-dir", str(run), *args_list, *extra])
        out.append(common.RunPaths(run))
    return out


CASES = [(ds, ["--dataset", ds, "--raw-dir", "RAW"]) for ds in F.WRITERS] + [
    ("synthetic", ["--dataset", "synthetic", "--n-users", "40", "--n-items", "30",
                   "--n-interactions", "1500", "--history-len", "4"])]


@pytest.mark.parametrize("ds,args_list", CASES, ids=[c[0] for c in CASES])
def test_same_samples_as_the_per_row_reference(ds, args_list, raw, tmp_path):
    args_list = [str(raw[ds]) if x == "RAW" else x for x in args_list] + SUBSETS
    pj, ps = both_forms(tmp_path, args_list)
    ref = reference(ds, args_list)
    assert (ps.data / "store" / "store.json").exists()
    for split in common.ALL_SPLITS:
        assert common.load_split(pj, split) == ref[split], split
        assert not ps.split(split).exists()  # each split lives in exactly one form
        assert common.load_split(ps, split) == ref[split], split
    assert common.read_json(pj.meta)["counts"] == common.read_json(ps.meta)["counts"]
    assert common.load_items(pj) == common.load_items(ps)


def test_ml100k_same_samples_when_cached(tmp_path):
    d = common.cache_dir() / "recbole-1.2.1" / "recbole/dataset_example/ml-100k"
    if not (d / "ml-100k.inter").exists():
        pytest.skip("ML-100K not fetched yet (./run.sh fetches it)")
    args_list = ["--dataset", "ml-100k", "--raw-dir", str(d)]
    pj, ps = both_forms(tmp_path, args_list)
    ref = reference("ml-100k", args_list)
    for split in common.ALL_SPLITS:
        rows = common.load_split(pj, split)
        assert rows == ref[split] and sample_store.SampleStore(ps.data / "store").rows(split) == rows


def test_store_arrays_match_rows(tmp_path):
    """SplitArrays read from the store hold what SplitArrays.from_rows makes of the JSONL."""
    pj, ps = both_forms(tmp_path, CASES[-1][1])
    st = sample_store.SampleStore(ps.data / "store")
    for split in common.SPLITS:
        a, b = st.arrays(split), sample_store.SplitArrays.from_rows(common.load_split(pj, split))
        assert len(a) == len(b)
        assert (a.users[a.uid] == b.users[b.uid]).all() and (a.items[a.iid] == b.items[b.iid]).all()
        assert (a.label == b.label).all() and (a.ts == b.ts).all()
        assert ((a.hi - a.lo) == (b.hi - b.lo)).all()
        for r in range(0, len(a), 7):
            assert (a.items[a.hist_iid[a.lo[r]:a.hi[r]]] == b.items[b.hist_iid[b.lo[r]:b.hi[r]]]).all()


def test_show_cli_prints_store_samples(tmp_path):
    _, ps = both_forms(tmp_path, CASES[-1][1])
    r = subprocess.run([sys.executable, str(ROOT / "sample_store.py"), str(ps.data), "test",
                        "--head", "2"], capture_output=True, text=True, cwd=ROOT)
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert r.returncode == 0 and rows == common.load_split(ps, "test")[:2]
    r = subprocess.run([sys.executable, str(ROOT / "sample_store.py"), str(ps.data), "nope"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0 and r.stderr.startswith("error: ") and "nope" in r.stderr


@pytest.mark.parametrize("model", ["popularity", "logreg", "din"])
def test_train_ctr_same_model_from_store_and_jsonl(model, tmp_path):
    """train_ctr.py on the columnar store trains exactly what it trains on the JSONL."""
    import train_ctr
    pj, ps = both_forms(tmp_path, CASES[-1][1])
    out = []
    for paths in (pj, ps):
        train_ctr.main(["--run-dir", str(paths.root), "--model", model, "--epochs", "2"])
        m = common.read_json(paths.ctr(model) / "metrics.json")
        out.append({s: m[s] for s in ("valid", "test")})
        out.append((paths.ctr(model) / "preds_test.jsonl").read_text())
    assert out[0] == out[2] and out[1] == out[3]


def test_gauc_matches_per_user_roc_auc():
    """metrics.gauc (vectorised) = the DIN paper's definition computed user by user."""
    import metrics
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(0)
    for _ in range(100):
        n = int(rng.integers(1, 50))
        u, y = rng.integers(0, int(rng.integers(1, 8)), n), rng.integers(0, 2, n)
        p = np.round(rng.random(n), int(rng.integers(1, 3)))  # ties within a user
        num = den = 0.0
        for x in np.unique(u):
            m = u == x
            if 0 < y[m].sum() < m.sum():
                num, den = num + m.sum() * roc_auc_score(y[m], p[m]), den + m.sum()
        got = metrics.gauc(y, p, u)
        assert (np.isnan(got) and den == 0) or abs(got - num / den) < 1e-12


@pytest.mark.parametrize("ds", ["ml-1m", "bookcrossing", "synthetic"])
def test_features_equal_the_per_row_reference(ds, raw, tmp_path):
    """Vocabulary and every model input of every split, from JSONL and from the store, equal
    the per-row featurizer's (user fields: ml-1m, bookcrossing; cold items; short histories)."""
    import ctr_features
    args_list = dict(CASES)[ds]
    args_list = [str(raw[ds]) if x == "RAW" else x for x in args_list] + SUBSETS
    pj, ps = both_forms(tmp_path, args_list)
    import train_ctr
    items, fields = common.load_items(pj), common.read_json(pj.meta)["user_fields"]
    train = common.load_split(pj, "train")
    vocab = REF.build_vocab(train, items, fields)
    for paths in (pj, ps):
        arr = train_ctr.load_split_arrays(paths, "train")
        assert ctr_features.build_vocab(arr, items, fields) == vocab
        for split in common.SPLITS:
            want = REF.featurize(common.load_split(pj, split), vocab)
            a = train_ctr.load_split_arrays(paths, split)
            got = ctr_features.Features(a, vocab).batch(np.arange(len(a)))
            got["hgen"] = got["ugen"][got["hpos"]]  # the batch's distinct items, expanded
            assert (got["ugen"][got["tpos"]] == got["tgen"]).all()
            for k in want:
                assert want[k].dtype == got[k].dtype and torch_equal(want[k], got[k]), (split, k)


def torch_equal(a, b):
    return tuple(a.shape) == tuple(b.shape) and bool((a == b).all())


def test_ties_follow_string_order_whatever_the_codes():
    """Samples sharing a timestamp are ordered by uid, then iid as strings ('10' < '9'), as the
    per-row code sorted them, even when the loader's codes (pyarrow: first appearance) are not."""
    tuples = [("9", "5", 1, 4.0), ("10", "5", 1, 4.0), ("9", "30", 2, 1.0), ("10", "4", 2, 5.0),
              ("9", "4", 2, 5.0), ("10", "30", 2, 2.0), ("2", "5", 2, 3.0), ("2", "4", 1, 3.0)]
    users, items = ["9", "10", "2"], ["5", "30", "4"]  # first-appearance order, not sorted
    inter = readers.Interactions([users.index(t[0]) for t in tuples], users,
                                 [items.index(t[1]) for t in tuples], items,
                                 [t[2] for t in tuples], [t[3] for t in tuples])
    s = data_prep.Samples(inter, [1] * len(tuples), {}, {}, 5, 0)
    want = sorted(range(len(tuples)), key=lambda k: (tuples[k][2], tuples[k][0], tuples[k][1], k))
    assert s.order.tolist() == want
    assert [h.tolist() for h in map(s.hist, range(len(tuples)))][2] == [0]  # user 9: item 5 at ts 1
