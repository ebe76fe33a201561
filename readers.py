"""Raw-format readers of data_prep.py: the paper's datasets in their official files -> interactions.

Each load_<dataset>(args) returns (interactions, items, users, sources):
  interactions  an Interactions table (columns uid, iid, ts, rating; ML-20M's ratings.csv is
                parsed by pyarrow, column-wise; the smaller formats row by row)
  items         {iid: {"iid", "title", "genres", ["year"]}}
  users         {uid: {field: str}}
  sources       the files read (name, sha256), for data/meta.json
Formats: MovieLens-100K (the RecBole wheel's atomic files, or u.data / u.item / u.user), ML-1M
(ratings.dat, movies.dat, users.dat), ML-20M (ratings.csv, movies.csv), BookCrossing
(BX-Book-Ratings.csv, BX-Books.csv, [BX-Users.csv]), Amazon Books (reviews_Books*.json /
Books*.json, meta_Books.json). A malformed line is a one-line error naming file, line and field.
Nothing here builds samples: that is data_prep.py's job (history, labels, splits).
"""
from __future__ import annotations

import ast
import csv
import gzip
import hashlib
import html
import io
import json
from pathlib import Path

import numpy as np

import common
from common import ExpCTRError


class Interactions:
    """The raw interactions as columns, in file order: uid and iid as codes into string tables
    (`users`, `items`: numpy str arrays, any order), ts int64, rating float64 (NaN = none)."""

    def __init__(self, uid, users, iid, items, ts, rating):
        self.uid, self.users = np.asarray(uid, np.int32), np.asarray(users, dtype=str)
        self.iid, self.items = np.asarray(iid, np.int32), np.asarray(items, dtype=str)
        self.ts, self.rating = np.asarray(ts, np.int64), np.asarray(rating, np.float64)

    def __len__(self):
        return len(self.ts)

    @classmethod
    def from_tuples(cls, rows: list[tuple]) -> "Interactions":
        """From (uid, iid, ts, rating) tuples (rating None = no rating)."""
        if not rows:
            return cls([], [], [], [], [], [])
        uid, iid, ts, rating = zip(*rows)
        users, u = np.unique(np.array(uid, dtype=str), return_inverse=True)
        items, i = np.unique(np.array(iid, dtype=str), return_inverse=True)
        return cls(u, users, i, items, ts, [np.nan if r is None else r for r in rating])

    def take(self, mask) -> "Interactions":
        return Interactions(self.uid[mask], self.users, self.iid[mask], self.items,
                            self.ts[mask], self.rating[mask])


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def need(raw_dir: Path | None, *names: str) -> Path:
    """First existing file among `names` (plain or .gz) in raw_dir, else a one-line error."""
    if raw_dir is None:
        raise ExpCTRError("--raw-dir is required for this dataset (folder with the raw files)")
    for n in names:
        for cand in (raw_dir / n, raw_dir / (n + ".gz")):
            if cand.exists():
                return cand
    raise ExpCTRError(f"{raw_dir / names[0]}: file not found (expected one of {', '.join(names)})")


def open_text(path: Path, encoding: str):
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding=encoding, newline="")
    return open(path, encoding=encoding, newline="")


def to_num(val: str, kind, where: str, field: str):
    try:
        return kind(float(val)) if kind is int else kind(val)
    except (ValueError, TypeError):
        raise ExpCTRError(f"{where}: field '{field}' should be a number, got {val!r}") from None


def age_bucket(age) -> str:
    """[ours] ML-1M's age bands, applied to every dataset with a numeric age."""
    try:
        a = int(float(age))
    except (ValueError, TypeError):
        return "unknown"
    if a <= 0 or a > 110:
        return "unknown"
    for hi, name in ((17, "under 18"), (24, "18-24"), (34, "25-34"), (44, "35-44"),
                     (49, "45-49"), (55, "50-55")):
        if a <= hi:
            return name
    return "56+"


# ---- plumbing: raw-format loaders -------------------------------------------------------
# Each loader returns (interactions, items, users, sources):
#   interactions: list of (uid, iid, ts, rating) ; items: {iid: {"iid","title","genres",["year"]}}
#   users: {uid: {field: str}} ; sources: list of files read.
def read_sep(path: Path, sep: str, n_fields: int, names: str, encoding: str = "utf-8"):
    """Lines of a `sep`-separated file with exactly n_fields fields; yields (where, fields)."""
    with open_text(path, encoding) as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split(sep)
            if len(parts) != n_fields:
                raise ExpCTRError(f"{path}:{lineno}: expected {n_fields} fields separated by "
                                  f"{sep!r} ({names}), got {len(parts)}")
            yield f"{path}:{lineno}", parts


def read_csv(path: Path, fields: list[str], delimiter=",", encoding="utf-8"):
    """Rows of a headed CSV as dicts; checks the header and every row's field count."""
    with open_text(path, encoding) as f:
        reader = csv.reader(f, delimiter=delimiter, quotechar='"')
        try:
            header = next(reader)
        except StopIteration:
            raise ExpCTRError(f"{path}:1: empty file, expected header {delimiter.join(fields)}")
        if header[:len(fields)] != fields:
            raise ExpCTRError(f"{path}:1: expected header {delimiter.join(fields)!r} "
                              f"(separator {delimiter!r}), got {delimiter.join(header)[:80]!r}")
        for row in reader:
            if not row:
                continue
            where = f"{path}:{reader.line_num}"
            if len(row) != len(header):
                raise ExpCTRError(f"{where}: expected {len(header)} fields separated by "
                                  f"{delimiter!r}, got {len(row)}")
            yield where, dict(zip(header, row))


def read_bx(path: Path, fields: list[str]):
    """BookCrossing CSV: ';'-separated, every field quoted, latin-1, one record per line.
    Inner quotes appear as \\" ; a few real rows end a field with a stray backslash (\\";),
    so a line that does not split into the header's field count is retried with \\" -> "."""
    with open_text(path, "latin-1") as f:
        header = None
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            row = next(csv.reader([line], delimiter=";", escapechar="\\"))
            if header is None:
                if row[:len(fields)] != fields:
                    raise ExpCTRError(f"{path}:{lineno}: expected header "
                                      f"{';'.join(fields)!r} (';'-separated, quoted), got {line[:80]!r}")
                header = row
                continue
            if len(row) != len(header):
                row = next(csv.reader([line.replace('\\"', '"')], delimiter=";"))
            if len(row) != len(header):
                raise ExpCTRError(f"{path}:{lineno}: expected {len(header)} quoted fields "
                                  f"separated by ';', got {len(row)}")
            yield f"{path}:{lineno}", {k: html.unescape(v) for k, v in zip(header, row)}


def split_title_year(title: str) -> tuple[str, str | None]:
    """'Toy Story (1995)' -> ('Toy Story', '1995')."""
    t = title.strip()
    if len(t) >= 7 and t[-1] == ")" and t[-6] == "(" and t[-5:-1].isdigit():
        return t[:-6].strip(), t[-5:-1]
    return t, None


def load_ml100k(args):
    if args.raw_dir:  # [ours] the same RecBole atomic files may be given by --raw-dir
        d = Path(args.raw_dir)
    else:
        d = common.fetch_from_wheel("recbole", "1.2.1", "recbole/dataset_example/ml-100k/") \
            / "recbole/dataset_example/ml-100k"

    def atomic(name, want):
        path = d / name
        if not path.exists():
            raise ExpCTRError(f"{path}: file not found")
        with open(path, encoding="utf-8") as f:
            header = f.readline().rstrip("\r\n").split("\t")
        names = [h.split(":")[0] for h in header]
        if names[:len(want)] != want:
            raise ExpCTRError(f"{path}:1: expected tab-separated header starting "
                              f"{want}, got {header[:len(want)]}")
        rows = read_sep(path, "\t", len(header), " ".join(header))
        next(rows)  # header line
        return path, ((w, dict(zip(names, p))) for w, p in rows)

    p_int, rows = atomic("ml-100k.inter", ["user_id", "item_id", "rating", "timestamp"])
    inter = [(r["user_id"], r["item_id"], to_num(r["timestamp"], int, w, "timestamp"),
              to_num(r["rating"], float, w, "rating")) for w, r in rows]
    p_item, rows = atomic("ml-100k.item", ["item_id", "movie_title", "release_year", "class"])
    items = {}
    for _, r in rows:
        it = {"iid": r["item_id"], "title": r["movie_title"].strip(),
              "genres": [g for g in r["class"].split() if g != "unknown"]}
        if r["release_year"].strip():
            it["year"] = r["release_year"].strip()
        items[it["iid"]] = it
    p_user, rows = atomic("ml-100k.user", ["user_id", "age", "gender", "occupation"])
    users = {r["user_id"]: {"age": age_bucket(r["age"]), "gender": r["gender"],
                            "occupation": r["occupation"]} for _, r in rows}
    return Interactions.from_tuples(inter), items, users, [p_int, p_item, p_user]


ML1M_OCC = ["other", "academic/educator", "artist", "clerical/admin", "college/grad student",
            "customer service", "doctor/health care", "executive/managerial", "farmer",
            "homemaker", "K-12 student", "lawyer", "programmer", "retired", "sales/marketing",
            "scientist", "self-employed", "technician/engineer", "tradesman/craftsman",
            "unemployed", "writer"]
ML1M_AGE = {"1": "under 18", "18": "18-24", "25": "25-34", "35": "35-44", "45": "45-49",
            "50": "50-55", "56": "56+"}


def load_ml1m(args):
    raw = Path(args.raw_dir) if args.raw_dir else None
    p_r, p_m, p_u = need(raw, "ratings.dat"), need(raw, "movies.dat"), need(raw, "users.dat")
    inter = [(p[0], p[1], to_num(p[3], int, w, "Timestamp"), to_num(p[2], float, w, "Rating"))
             for w, p in read_sep(p_r, "::", 4, "UserID::MovieID::Rating::Timestamp", "latin-1")]
    items = {}
    for _, p in read_sep(p_m, "::", 3, "MovieID::Title::Genres", "latin-1"):
        title, year = split_title_year(p[1])
        items[p[0]] = {"iid": p[0], "title": title, "genres": [g for g in p[2].split("|") if g]}
        if year:
            items[p[0]]["year"] = year
    users = {}
    for w, p in read_sep(p_u, "::", 5, "UserID::Gender::Age::Occupation::Zip-code", "latin-1"):
        occ = int(to_num(p[3], int, w, "Occupation"))
        users[p[0]] = {"age": ML1M_AGE.get(p[2], "unknown"), "gender": p[1],
                       "occupation": ML1M_OCC[occ] if 0 <= occ < len(ML1M_OCC) else "other"}
    return Interactions.from_tuples(inter), items, users, [p_r, p_m, p_u]


def read_ratings_csv(path: Path) -> Interactions:
    """ML-20M's ratings.csv (userId,movieId,rating,timestamp) in one pass of pyarrow's
    multithreaded CSV reader (ids kept as strings, dictionary-encoded). [ours] A malformed file is
    re-read by the row-by-row reader, only to name the bad line in the one-line error."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    fields = ["userId", "movieId", "rating", "timestamp"]
    with open_text(path, "utf-8") as f:
        header = f.readline().rstrip("\r\n").split(",")
    if header[:4] != fields:
        raise ExpCTRError(f"{path}:1: expected header {','.join(fields)!r} (separator ','), "
                          f"got {','.join(header)[:80]!r}")
    try:
        t = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
            column_types={"userId": pa.string(), "movieId": pa.string(), "rating": pa.float64(),
                          "timestamp": pa.float64()}, include_columns=fields))
    except (pa.ArrowInvalid, UnicodeDecodeError):
        for _ in read_csv(path, fields):  # raises the precise one-line error
            pass
        raise ExpCTRError(f"{path}: not a valid CSV of {','.join(fields)}") from None
    cols = {}
    for name in ("userId", "movieId"):
        enc = t.column(name).combine_chunks().dictionary_encode()
        cols[name] = (enc.indices.to_numpy(zero_copy_only=False),
                      np.array(enc.dictionary.to_pylist(), dtype=str))
    rating, ts = (t.column(c).to_numpy() for c in ("rating", "timestamp"))
    del t
    pa.default_memory_pool().release_unused()
    bad = np.flatnonzero(np.isnan(rating) | np.isnan(ts))
    if len(bad):  # an empty field (pyarrow reads it as null)
        raise ExpCTRError(f"{path}:{bad[0] + 2}: fields 'rating' and 'timestamp' should be numbers")
    return Interactions(cols["userId"][0], cols["userId"][1], cols["movieId"][0],
                        cols["movieId"][1], ts.astype(np.int64), rating)


def load_ml20m(args):
    raw = Path(args.raw_dir) if args.raw_dir else None
    p_r, p_m = need(raw, "ratings.csv"), need(raw, "movies.csv")
    inter = read_ratings_csv(p_r)
    items = {}
    for _, r in read_csv(p_m, ["movieId", "title", "genres"]):
        title, year = split_title_year(r["title"])
        genres = [g for g in r["genres"].split("|") if g and g != "(no genres listed)"]
        items[r["movieId"]] = {"iid": r["movieId"], "title": title, "genres": genres}
        if year:
            items[r["movieId"]]["year"] = year
    return inter, items, {}, [p_r, p_m]


def load_bookcrossing(args):
    raw = Path(args.raw_dir) if args.raw_dir else None
    p_r, p_b = need(raw, "BX-Book-Ratings.csv"), need(raw, "BX-Books.csv")
    inter = []
    # [ours] BookCrossing has no timestamps: the row order of BX-Book-Ratings.csv is the clock.
    # Implicit ratings (0) are dropped (PAPER_NOTES §7).
    for n, (w, r) in enumerate(read_bx(p_r, ["User-ID", "ISBN", "Book-Rating"])):
        rating = to_num(r["Book-Rating"], float, w, "Book-Rating")
        if rating > 0:
            inter.append((r["User-ID"], r["ISBN"].strip(), n, rating))
    items = {}
    for _, r in read_bx(p_b, ["ISBN", "Book-Title", "Book-Author", "Year-Of-Publication"]):
        # [ours] no genres in BookCrossing; the author is kept as an extra item field
        it = {"iid": r["ISBN"].strip(), "title": r["Book-Title"].strip(), "genres": [],
              "author": r["Book-Author"].strip()}
        if r["Year-Of-Publication"].strip() not in ("", "0"):
            it["year"] = r["Year-Of-Publication"].strip()
        items[it["iid"]] = it
    users, sources = {}, [p_r, p_b]
    if raw is not None and (raw / "BX-Users.csv").exists():
        p_u = raw / "BX-Users.csv"
        for _, r in read_bx(p_u, ["User-ID", "Location", "Age"]):
            country = r["Location"].split(",")[-1].strip() or "unknown"
            users[r["User-ID"]] = {"age": age_bucket(r["Age"]), "country": country}
        sources.append(p_u)
    return Interactions.from_tuples(inter), items, users, sources


def read_json_lines(path: Path):
    """JSON lines; the 2014 Amazon dumps use Python dict literals, so fall back to ast."""
    with open_text(path, "utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                try:
                    row = ast.literal_eval(line)
                except (ValueError, SyntaxError):
                    raise ExpCTRError(f"{path}:{lineno}: expected one JSON object per line") from None
            if not isinstance(row, dict):
                raise ExpCTRError(f"{path}:{lineno}: expected a JSON object")
            yield f"{path}:{lineno}", row


def load_amazon_books(args):
    raw = Path(args.raw_dir) if args.raw_dir else None
    p_r = need(raw, "reviews_Books_5.json", "reviews_Books.json", "Books_5.json", "Books.json")
    p_m = need(raw, "meta_Books.json")
    inter = []
    for w, r in read_json_lines(p_r):
        for k in ("reviewerID", "asin", "overall", "unixReviewTime"):
            if k not in r:
                raise ExpCTRError(f"{w}: missing field '{k}'")
        inter.append((str(r["reviewerID"]), str(r["asin"]),
                      to_num(r["unixReviewTime"], int, w, "unixReviewTime"),
                      to_num(r["overall"], float, w, "overall")))
    items = {}
    for w, r in read_json_lines(p_m):
        if "asin" not in r:
            raise ExpCTRError(f"{w}: missing field 'asin'")
        cats = r.get("category", r.get("categories", []))
        flat = [c for c in cats] if cats and isinstance(cats[0], str) else \
            [c for sub in cats for c in sub]
        # [ours] genres = the category path below the top-level "Books", at most 3, deduplicated
        genres = list(dict.fromkeys(c.strip() for c in flat if c.strip() and c != "Books"))[:3]
        title = str(r.get("title", "")).strip()
        if title:  # items without a title cannot be shown to the LLM; their ratings are dropped
            items[str(r["asin"])] = {"iid": str(r["asin"]), "title": title, "genres": genres}
    return Interactions.from_tuples(inter), items, {}, [p_r, p_m]


LOADERS = {"ml-100k": load_ml100k, "ml-1m": load_ml1m, "ml-20m": load_ml20m,
           "bookcrossing": load_bookcrossing, "amazon-books": load_amazon_books}
