"""data_prep.py: raw loaders on tiny fixtures, leakage, determinism, bad input, subsets."""
from __future__ import annotations

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

RAW = ["ml-1m", "ml-20m", "ml-100k", "bookcrossing", "amazon-books"]


def prep(run, *args):
    data_prep.main(["--run-dir", str(run), *map(str, args)])
    paths = common.RunPaths(run)
    return paths, {s: common.load_split(paths, s) for s in common.ALL_SPLITS}, common.load_items(paths)


def prep_cli(run, *args):
    return subprocess.run([sys.executable, str(ROOT / "data_prep.py"), "--run-dir", str(run),
                           *map(str, args)], capture_output=True, text=True, cwd=ROOT)


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    d = tmp_path_factory.mktemp("raw")
    return {k: w(d / k) for k, w in F.WRITERS.items()}


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    run = tmp_path_factory.mktemp("syn") / "run"
    return prep(run, "--dataset", "synthetic", "--n-users", 60, "--n-items", 40,
                "--n-interactions", 3000, "--history-len", 5)


# ---- loaders ----------------------------------------------------------------------------
EXPECTED_TITLES = {
    "ml-1m": {"2": ("Amélie (Fabuleux destin d'Amélie Poulain, Le)", "2001"),
              "5": ('"Quoted" Film: 1/2', "1999"), "6": ("Untitled Project", None)},
    "ml-20m": {"2": ("American President, The", "1995"), "3": ('Crazy "Quoted" Film, A', "2000"),
               "4": ("Amélie (Fabuleux destin d'Amélie Poulain; Le)", "2001")},
    "ml-100k": {"2": ("Misérables, Les", "1995"), "3": ("Á köldum klaka (Cold Fever)", "1994"),
                "4": ("Unknown Film", None)},
    "bookcrossing": {"0060973129": ("Amélie; ou la vie à Paris", "1991"),
                     "0374157065": ('The "Flu" Story & Other Tales', "1999"),
                     "078946697X": ("DK Readers: Creating the X-Men, How It All Began (Level 4)", "2000")},
    "amazon-books": {"0000000116": ('Amélie: A "Quoted" Story, Vol. 1', None)},
}


@pytest.mark.parametrize("ds", RAW)
def test_loader_parses_awkward_lines(ds, raw, tmp_path):
    paths, splits, items = prep(tmp_path / "run", "--dataset", ds, "--raw-dir", raw[ds])
    for iid, (title, year) in EXPECTED_TITLES[ds].items():
        assert items[iid]["title"] == title
        assert items[iid].get("year") == year
    meta = common.read_json(paths.meta)
    assert all(meta["counts"][s] > 0 for s in common.SPLITS)
    assert len(meta["sources"]) >= 2 and all(len(s["sha256"]) == 64 for s in meta["sources"])
    allrows = [s for v in splits.values() for s in v]
    # label rule: rating >= default threshold
    thr = data_prep.DEFAULT_THRESHOLD[ds]
    assert all(s["label"] == int(s["rating"] >= thr) for s in allrows)
    # every (uid, iid) of the raw data except each user's first interaction(s) is a sample
    ts = F.raw_ts(ds)
    assert {(s["uid"], s["iid"]) for s in allrows} <= set(ts)
    assert len(allrows) == meta["n_samples_before_subset"] == 25


def test_loader_details(raw, tmp_path):
    _, sp, items = prep(tmp_path / "a", "--dataset", "ml-1m", "--raw-dir", raw["ml-1m"])
    assert items["4"]["genres"] == ["Action", "Adventure", "Fantasy", "Sci-Fi"]
    assert sp["train"][0]["user"].keys() == {"age", "gender", "occupation"}
    _, _, items = prep(tmp_path / "b", "--dataset", "ml-20m", "--raw-dir", raw["ml-20m"])
    assert items["5"]["genres"] == []  # "(no genres listed)"
    _, _, items = prep(tmp_path / "c", "--dataset", "amazon-books", "--raw-dir", raw["amazon-books"])
    assert items["0000000868"]["genres"] == ["Science Fiction & Fantasy", "Fantasy", "Humor"]
    _, _, items = prep(tmp_path / "d", "--dataset", "ml-100k", "--raw-dir", raw["ml-100k"])
    assert items["4"]["genres"] == [] and items["1"]["genres"] == ["Animation", "Children's", "Comedy"]
    paths, sp, _ = prep(tmp_path / "e", "--dataset", "bookcrossing", "--raw-dir", raw["bookcrossing"])
    rows = [s for v in sp.values() for s in v]
    assert all(s["rating"] > 0 for s in rows)  # implicit zeros dropped
    assert {s["user"]["age"] for s in rows if s["uid"] == "2"} == {"unknown"}  # Age "NULL"
    assert "label = rating >= 5" in common.read_json(paths.meta)["label_rule"]
    _, sp, _ = prep(tmp_path / "f", "--dataset", "ml-1m", "--raw-dir", raw["ml-1m"],
                    "--label-threshold", 3)
    assert all(s["label"] == int(s["rating"] >= 3) for v in sp.values() for s in v)


# ---- leakage -----------------------------------------------------------------------------
@pytest.mark.parametrize("ds", ["ml-1m", "bookcrossing"])
def test_history_strictly_before_target(ds, raw, tmp_path):
    _, splits, _ = prep(tmp_path / "run", "--dataset", ds, "--raw-dir", raw[ds], "--history-len", 3)
    ts = F.raw_ts(ds)
    for rows in splits.values():
        for s in rows:
            assert ts[(s["uid"], s["iid"])] == s["ts"]
            hist_ts = [ts[(s["uid"], h)] for h, _ in s["hist"]]
            assert all(t < s["ts"] for t in hist_ts), (s, hist_ts)
            # exactly the last K strictly-earlier interactions, oldest first
            earlier = sorted(t for (u, _), t in ts.items() if u == s["uid"] and t < s["ts"])
            assert hist_ts == earlier[-3:]
    # user 1's tied items (same second) never see each other
    tied = [s for v in splits.values() for s in v if s["uid"] == "1" and s["ts"] == 1200]
    for s in tied:
        assert {"3", "4"}.isdisjoint(h for h, _ in s["hist"])


def test_split_is_temporal_and_history_labels_match(syn):
    paths, splits, _ = syn
    meta = common.read_json(paths.meta)
    b = meta["split_boundaries"]
    assert max(s["ts"] for s in splits["train"]) < b["valid_start_ts"] <= min(s["ts"] for s in splits["valid"])
    assert max(s["ts"] for s in splits["valid"]) < b["test_start_ts"] <= min(s["ts"] for s in splits["test"])
    label = {(s["uid"], s["iid"]): s["label"] for v in splits.values() for s in v}
    for v in splits.values():
        for s in v:
            assert len(s["hist"]) >= 1 and len(s["hist"]) <= 5
            for h, lab in s["hist"]:
                if (s["uid"], h) in label:
                    assert label[(s["uid"], h)] == lab


def test_synthetic_world(syn):
    paths, splits, items = syn
    meta = common.read_json(paths.meta)
    rows = [s for v in splits.values() for s in v]
    assert all(s["cause"] in items[s["iid"]]["genres"] for s in rows)
    assert all(1 <= len(items[s["iid"]]["genres"]) <= 2 for s in rows)
    assert len({it["title"] for it in items.values()}) == len(items)
    assert 0.2 < meta["pos_rate"]["train"] < 0.8 and meta["oracle_test_auc"] > 0.75


# ---- determinism, idempotence, subsets ---------------------------------------------------------
def test_determinism_and_skip(tmp_path):
    args = ["--dataset", "synthetic", "--n-users", 30, "--n-items", 20, "--n-interactions", 600]
    for run in ("a", "b"):
        prep(tmp_path / run, *args)
    for f in ["train.jsonl", "valid.jsonl", "test.jsonl", "items.jsonl", "meta.json"]:
        assert (tmp_path / "a/data" / f).read_bytes() == (tmp_path / "b/data" / f).read_bytes()
    prep(tmp_path / "c", *args, "--seed", 1)
    assert (tmp_path / "a/data/train.jsonl").read_bytes() != (tmp_path / "c/data/train.jsonl").read_bytes()
    r = prep_cli(tmp_path / "a", *args)
    assert r.returncode == 0 and "skip" in r.stdout
    r = prep_cli(tmp_path / "a", *args, "--history-len", 3)
    assert r.returncode != 0 and "--force" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = prep_cli(tmp_path / "a", *args, "--history-len", 3, "--force")
    assert r.returncode == 0, r.stderr


def test_max_samples_subset(tmp_path):
    args = ["--dataset", "synthetic", "--n-users", 40, "--n-items", 30, "--n-interactions", 1500]
    _, full, _ = prep(tmp_path / "full", *args)
    _, sub, _ = prep(tmp_path / "sub", *args, "--max-samples", "train=50", "--max-samples", "test=20")
    _, sub2, _ = prep(tmp_path / "sub2", *args, "--max-samples", "train=50", "--max-samples", "test=20")
    _, sub3, _ = prep(tmp_path / "sub3", *args, "--max-samples", "train=50", "--seed", 7)
    assert len(sub["train"]) == 50 and len(sub["test"]) == 20 and sub["valid"] == full["valid"]
    assert sub == sub2  # seeded
    key = lambda s: (s["uid"], s["iid"], s["ts"])
    for split in ("train", "test"):
        full_keys = [key(s) for s in full[split]]
        got = [full_keys.index(key(s)) for s in sub[split]]
        assert got == sorted(got)  # a within-split subset, time order kept
    assert [key(s) for s in sub3["train"]] != [key(s) for s in sub["train"]]


# ---- bad input: one line on stderr naming the file, nothing left behind ----------------------
def corrupt(raw_dir: Path, tmp: Path, fname: str, text: str | None, mode: str = "append") -> Path:
    d = tmp / "raw"
    d.mkdir()
    for f in raw_dir.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    if text is None:
        (d / fname).unlink()
    elif mode == "replace":
        (d / fname).write_bytes(text.encode("latin-1"))
    else:
        with open(d / fname, "ab") as f:
            f.write(text.encode("latin-1"))
    return d


BAD = [
    ("missing", "ml-1m", "movies.dat", None, "replace", []),
    ("separator", "ml-1m", "ratings.dat", "1,2,5,978300760\n", "replace", []),
    ("garbled", "ml-1m", "ratings.dat", "1::2::five::978300760\n", "append", []),
    ("garbled-csv", "ml-20m", "ratings.csv", "1,2,4.0\n", "append", []),
    ("separator-bx", "bookcrossing", "BX-Books.csv", "ISBN,Book-Title,Book-Author\n", "replace", []),
    ("garbled-json", "amazon-books", "reviews_Books_5.json", '{"reviewerID": "A1", \n', "append", []),
    ("empty", "ml-1m", "ratings.dat", "", "replace", []),
    ("empty-history", "ml-1m", "ratings.dat", None, None, ["--min-history", 50]),
]


@pytest.mark.parametrize("name,ds,fname,text,mode,extra", BAD, ids=[b[0] for b in BAD])
def test_bad_input_one_line_error(name, ds, fname, text, mode, extra, raw, tmp_path):
    d = raw[ds] if mode is None else corrupt(raw[ds], tmp_path, fname, text, mode)
    run = tmp_path / "runs" / "x"
    run.parent.mkdir()
    r = prep_cli(run, "--dataset", ds, "--raw-dir", d, *extra)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert fname in lines[0]
    if name in ("separator", "garbled", "garbled-csv", "garbled-json"):
        assert f"{fname}:" in lines[0]  # names the line
    assert not run.exists() and list((tmp_path / "runs").iterdir()) == []


def test_bad_input_keeps_existing_run_intact(raw, tmp_path):
    run = tmp_path / "run"
    prep(run, "--dataset", "ml-1m", "--raw-dir", raw["ml-1m"])
    before = {p: p.read_bytes() for p in (run / "data").iterdir()}
    d = corrupt(raw["ml-1m"], tmp_path, "ratings.dat", "1::2::x::3\n")
    r = prep_cli(run, "--dataset", "ml-1m", "--raw-dir", d, "--force")
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1
    assert {p: p.read_bytes() for p in (run / "data").iterdir()} == before
    assert sorted(p.name for p in run.iterdir()) == ["data", "metrics.jsonl"]


def test_synthetic_truth_gives_each_genre_taste_and_the_cause_is_the_largest():
    # scripts/cause_information.py reads these contributions: the cause must be the item genre
    # of largest |taste|, and the genres exactly the item's
    args = data_prep.parse_args(["--run-dir", "unused", "--dataset", "synthetic", "--n-users", "30",
                                 "--n-items", "20", "--n-interactions", "400"])
    _, items, _, truth = data_prep.make_synthetic(args)
    assert truth and any(len(c) == 2 for *_, c in truth.values())
    for (u, i), (y, cause, p, c) in truth.items():
        assert list(c) == items[i]["genres"]
        assert abs(c[cause]) == max(abs(v) for v in c.values())
        assert y in (0, 1) and 0 < p < 1


def test_cause_information_pairs_the_cause_with_the_other_genre_of_2_genre_items():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import cause_information
    w = cause_information.world_rows("--n-users 30 --n-items 20 --n-interactions 400")
    assert len(w["y"]) > 0 and set(np.unique(w["y"])) <= {0, 1}
    assert np.all(np.abs(w["cause"]) >= np.abs(w["other"]))
    assert np.any(w["cause"] != w["other"])


def test_cause_readable_rules_read_the_prompts_counts_and_refuse_test(tmp_path, capsys):
    """scripts/cause_readable.py: per 2-genre target, the first-genre echo, the most-seen and the
    largest-|liked - disliked| genre, computed from the history counts the prompt shows, and a
    rule fitted on train (here: train's cause is always the larger-|net| genre, so it is net)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import cause_readable
    items = [{"iid": "1", "title": "T", "genres": ["Action", "Comedy"]},
             {"iid": "2", "title": "A", "genres": ["Action"]},
             {"iid": "3", "title": "C", "genres": ["Comedy"]},
             {"iid": "4", "title": "W", "genres": ["War"]}]

    def row(u, cause, la, da, lc, dc):  # counts: Action liked/disliked, Comedy liked/disliked
        hist = [["2", 1]] * la + [["2", 0]] * da + [["3", 1]] * lc + [["3", 0]] * dc
        return {"uid": u, "iid": "1", "label": 1, "ts": 1, "cause": cause, "hist": hist}
    # s1: Action 0/1, Comedy 3/0: most_seen and net pick Comedy (the cause)
    # s2: Action 1/1 (net 0), Comedy 0/3: both pick Comedy; the cause is Action (the echo's)
    # s3: Action 5/0 (net 5), Comedy 1/5 (net 4): most_seen Comedy, net Action (the cause)
    valid = [row("u", "Comedy", 0, 1, 3, 0), row("v", "Action", 1, 1, 0, 3),
             row("w", "Action", 5, 0, 1, 5),
             {"uid": "x", "iid": "4", "label": 1, "ts": 4, "cause": "War", "hist": []}]  # 1 genre
    train = [row(f"t{k}", "Action", 2 + k % 4, k % 2, 0, 1) for k in range(10)] + \
            [row(f"s{k}", "Comedy", 0, 1, 2 + k % 4, k % 2) for k in range(10)]
    (tmp_path / "data").mkdir()
    common.write_jsonl(tmp_path / "data" / "items.jsonl", items)
    common.write_jsonl(tmp_path / "data" / "train.jsonl", train)
    common.write_jsonl(tmp_path / "data" / "valid.jsonl", valid)
    res = cause_readable.main(["--run-dir", str(tmp_path), "--split", "valid", "--n-boot", "50"])
    v = res["valid"]
    assert v["n"] == 3
    assert v["echo_first_genre"]["cause_hit"] == pytest.approx(2 / 3)
    assert v["most_seen"]["cause_hit"] == pytest.approx(1 / 3)
    assert v["net"]["cause_hit"] == pytest.approx(2 / 3)
    assert v["learned"]["cause_hit"] == pytest.approx(2 / 3)  # = net; reversed it would be 1/3
    assert v["most_seen"]["minus_echo"] == pytest.approx(-1 / 3)
    assert "| valid | 3 | net | 0.667 | +0.000" in capsys.readouterr().out
    with pytest.raises(common.ExpCTRError, match="--split test: refused"):
        cause_readable.main(["--run-dir", str(tmp_path), "--split", "valid,test"])
    common.write_jsonl(tmp_path / "data" / "train.jsonl", train[:10])
    with pytest.raises(common.ExpCTRError, match="always the first genre"):
        cause_readable.main(["--run-dir", str(tmp_path), "--split", "valid"])
    common.write_jsonl(tmp_path / "data" / "items.jsonl",
                       [dict(items[0], genres=["Action", "Comedy", "War"])] + items[1:])
    with pytest.raises(common.ExpCTRError, match="> 2 genres"):
        cause_readable.main(["--run-dir", str(tmp_path), "--split", "valid"])
