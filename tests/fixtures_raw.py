"""Tiny hand-written raw files in each official format data_prep.py reads (never real data).

Every writer puts the same small world on disk (5 users x 6 items, one timestamp tie) plus the
awkward lines each format is known for: latin-1 non-ASCII titles, commas / semicolons inside
quoted titles, doubled or backslash-escaped quotes, a BookCrossing row with a stray backslash,
implicit 0 ratings, 2014-style Python-literal Amazon metadata.
"""
from __future__ import annotations

import json
from pathlib import Path

USERS = ["1", "2", "3", "4", "5"]
N_ITEMS = 6


def interactions():
    """(uid, item index 0..5, rating 1..5, ts); user 1 rates items 2 and 3 at the same second."""
    rows = []
    for u, uid in enumerate(USERS):
        for i in range(N_ITEMS):
            ts = 1000 + 100 * i + u
            if uid == "1" and i == 3:
                ts = 1000 + 100 * 2 + u  # tie with item 2
            rating = 1 + (3 * u + 2 * i) % 5
            rows.append((uid, i, rating, ts))
    return rows


def raw_ts(dataset: str) -> dict:
    """(uid, iid) -> timestamp as data_prep will see it (BookCrossing: data row number)."""
    if dataset == "bookcrossing":
        return {(u, BX_ISBN[i]): n for n, (u, i, r) in enumerate(bx_lines()) if r > 0}
    if dataset == "amazon-books":
        return {(f"A{u}XYZ", AMZ_ASIN[i]): ts for u, i, _, ts in interactions()}
    return {(u, str(i + 1)): ts for u, i, _, ts in interactions()}


# ---- MovieLens-1M: '::'-separated, latin-1 ------------------------------------------------
ML1M_MOVIES = [
    "1::Toy Story (1995)::Animation|Children's|Comedy",
    "2::Amélie (Fabuleux destin d'Amélie Poulain, Le) (2001)::Comedy|Romance",
    "3::City of Lost Children, The (Cité des enfants perdus, La) (1995)::Adventure|Sci-Fi",
    "4::Star Wars: Episode IV - A New Hope (1977)::Action|Adventure|Fantasy|Sci-Fi",
    '5::"Quoted" Film: 1/2 (1999)::Crime|Thriller',
    "6::Untitled Project::Drama",
]


def write_ml1m(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "ratings.dat").write_bytes("".join(
        f"{u}::{i + 1}::{r}::{ts}\n" for u, i, r, ts in interactions()).encode("latin-1"))
    (d / "movies.dat").write_bytes(("\n".join(ML1M_MOVIES) + "\n").encode("latin-1"))
    (d / "users.dat").write_bytes("".join(
        f"{u}::{'MF'[int(u) % 2]}::{[1, 18, 25, 35, 56][int(u) - 1]}::{int(u) * 3}::0{u}123\n"
        for u in USERS).encode("latin-1"))
    return d


# ---- MovieLens-20M: CSV with a header, quoted titles, UTF-8 ------------------------------
ML20M_MOVIES = [
    "1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy",
    '2,"American President, The (1995)",Comedy|Drama|Romance',
    '3,"Crazy ""Quoted"" Film, A (2000)",Comedy',
    "4,Amélie (Fabuleux destin d'Amélie Poulain; Le) (2001),Comedy|Romance",
    "5,Heat (1995),(no genres listed)",
    '6,"Lord of the Rings, The: Part ""Two"" (2002)",Adventure|Fantasy',
]


def write_ml20m(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "ratings.csv").write_text("userId,movieId,rating,timestamp\n" + "".join(
        f"{u},{i + 1},{r - 0.5 if i == 1 else r:.1f},{ts}\n"
        for u, i, r, ts in interactions()), encoding="utf-8")
    (d / "movies.csv").write_text("movieId,title,genres\n" + "\n".join(ML20M_MOVIES) + "\n",
                                  encoding="utf-8")
    return d


# ---- MovieLens-100K as RecBole atomic files (tab-separated, typed headers) -----------------
def write_ml100k(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "ml-100k.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + "".join(
            f"{u}\t{i + 1}\t{r}\t{ts}\n" for u, i, r, ts in interactions()), encoding="utf-8")
    (d / "ml-100k.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        "1\tToy Story\t1995\tAnimation Children's Comedy\n"
        "2\tMisérables, Les\t1995\tDrama Musical\n"
        "3\tÁ köldum klaka (Cold Fever)\t1994\tComedy Drama\n"
        "4\tUnknown Film\t\tunknown\n"
        "5\tFilm \"Quoted\"\t1990\tFilm-Noir Sci-Fi\n"
        "6\tLast One\t1997\tWar\n", encoding="utf-8")
    (d / "ml-100k.user").write_text(
        "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n" + "".join(
            f"{u}\t{15 + 10 * int(u)}\t{'MF'[int(u) % 2]}\twriter\t1000{u}\n" for u in USERS),
        encoding="utf-8")
    return d


# ---- BookCrossing: ';'-separated, every field quoted, latin-1 ------------------------------
BX_ISBN = ["0195153448", "0002005018", "0060973129", "0374157065", "0393045218", "078946697X"]
BX_BOOKS = [
    '"0195153448";"Classical Mythology";"Mark P. O. Morford";"2002";"Oxford University Press";"u";"u";"u"',
    '"0002005018";"Clara Callan";"Richard Bruce Wright";"2001";"HarperFlamingo Canada";"u";"u";"u"',
    '"0060973129";"Amélie; ou la vie à Paris";"Carlo D\'Este";"1991";"HarperPerennial";"u";"u";"u"',
    '"0374157065";"The \\"Flu\\" Story &amp; Other Tales";"Gina Bari Kolata";"1999";"Farrar";"u";"u";"u"',
    '"0393045218";"The Mummies of Urumchi";"E. J. W. Barber";"0";"W. W. Norton";"u";"u";"u"',
    '"078946697X";"DK Readers: Creating the X-Men, How It All Began (Level 4)\\";"Michael Teitelbaum";"2000";"DK";"u";"u";"u"',
]


def bx_lines():
    """(uid, item index, rating 0-10) in file order; 0 = implicit rating that data_prep drops."""
    out = []
    for u, i, r, ts in interactions():
        out.append((u, i, 2 * r))
        if i == 0:
            out.append((u, 4, 0))
    return out


def write_bx(d: Path, with_users: bool = True) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    lines = ['"User-ID";"ISBN";"Book-Rating"'] + [
        f'"{u}";"{BX_ISBN[i]}";"{r}"' for u, i, r in bx_lines()]
    (d / "BX-Book-Ratings.csv").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    head = ('"ISBN";"Book-Title";"Book-Author";"Year-Of-Publication";"Publisher";'
            '"Image-URL-S";"Image-URL-M";"Image-URL-L"')
    (d / "BX-Books.csv").write_bytes(("\n".join([head] + BX_BOOKS) + "\n").encode("latin-1"))
    if with_users:
        users = ['"User-ID";"Location";"Age"'] + [
            f'"{u}";"nyc, new york, usa";"{"NULL" if u == "2" else 20 + int(u)}"' for u in USERS]
        (d / "BX-Users.csv").write_bytes(("\n".join(users) + "\n").encode("latin-1"))
    return d


# ---- Amazon Books: JSON lines (reviews), JSON / Python-literal lines (metadata) -------------
AMZ_ASIN = ["0000000116", "0000000868", "0000013714", "0000015393", "0000029831", "0000031852"]


def write_amazon(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "reviews_Books_5.json", "w", encoding="utf-8") as f:
        for u, i, r, ts in interactions():
            f.write(json.dumps({"reviewerID": f"A{u}XYZ", "asin": AMZ_ASIN[i], "overall": float(r),
                                "unixReviewTime": ts, "reviewText": 'He said "great", then; left'})
                    + "\n")
    meta = [
        json.dumps({"asin": AMZ_ASIN[0], "title": "Amélie: A \"Quoted\" Story, Vol. 1",
                    "category": ["Books", "Literature & Fiction", "Classics"]}, ensure_ascii=False),
        # 2014 dumps: Python dict literals with a list of category paths
        str({"asin": AMZ_ASIN[1], "title": "Interesting Times", "categories":
             [["Books", "Science Fiction & Fantasy", "Fantasy"], ["Books", "Humor"]]}),
        json.dumps({"asin": AMZ_ASIN[2], "title": "Cooking, Simply", "category": ["Books"]}),
        json.dumps({"asin": AMZ_ASIN[3], "title": "Mystery Road", "category": ["Books", "Mystery"]}),
        json.dumps({"asin": AMZ_ASIN[4], "title": "History of Rome", "category": ["Books", "History"]}),
        json.dumps({"asin": AMZ_ASIN[5], "title": "Poems", "category": ["Books", "Poetry"]}),
    ]
    (d / "meta_Books.json").write_text("\n".join(meta) + "\n", encoding="utf-8")
    return d


WRITERS = {"ml-1m": write_ml1m, "ml-20m": write_ml20m, "ml-100k": write_ml100k,
           "bookcrossing": write_bx, "amazon-books": write_amazon}
