"""Generate MovieLens-20M-shaped raw files (ratings.csv, movies.csv) of a given size, seeded.

For the data-path benchmark (scripts/bench_data_path.py): real data is never committed, so this
writes files in the exact ML-20M format - header `userId,movieId,rating,timestamp`, ratings
0.5..5.0 in half steps, Unix timestamps, `movieId,title,genres` with quoted titles and
`|`-separated genres - with ML-20M's proportions: 138,493 users and 27,278 movies at 20M ratings
(users scale with the size, movies with its square root), per-user activity lognormal, item
popularity Zipf-like, each user's ratings inside a personal time window, no repeated
(user, movie) pair.

    python scripts/gen_ml20m.py --ratings 2000000 --out /tmp/ml20m-2m
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

GENRES = ["Action", "Adventure", "Animation", "Children", "Comedy", "Crime", "Documentary",
          "Drama", "Fantasy", "Film-Noir", "Horror", "IMAX", "Musical", "Mystery", "Romance",
          "Sci-Fi", "Thriller", "War", "Western"]
WORDS = ["Night", "River", "Story", "Return", "Last", "City", "Love", "War", "Dream", "Secret",
         "Man", "Woman", "House", "Road", "Star", "Summer", "Dark", "King", "Girl", "Game"]
# genres per movie, 1..10 (ML-20M: mean ~2.0, a few movies with 8-10)
GENRE_COUNT_P = np.array([40, 30, 18, 7, 3, 1, 0.5, 0.3, 0.1, 0.1])
GENRE_COUNT_P = GENRE_COUNT_P / GENRE_COUNT_P.sum()
RATING_P = np.array([1.1, 3.4, 3.3, 7.2, 4.4, 21.4, 11.0, 27.4, 7.6, 13.2])  # ML-20M's shares, %


def generate(n_ratings: int, seed: int = 0):
    """-> (uid, iid, rating, ts) arrays with unique (uid, iid), and the movies table rows."""
    rng = np.random.default_rng(seed)
    scale = n_ratings / 20_000_263
    n_users = max(10, int(round(138_493 * scale)))
    n_items = max(20, int(round(27_278 * min(1.0, scale) ** 0.5)))
    act = rng.lognormal(0, 1.0, n_users)
    per = np.maximum(20, np.round(act / act.sum() * n_ratings * 1.02)).astype(np.int64)
    per = np.minimum(per, n_items // 2)
    uid = np.repeat(np.arange(1, n_users + 1), 3 * per)  # 3x draws, then repeats dropped
    pop = 1.0 / np.arange(1, n_items + 1) ** 0.9
    pop = rng.permutation(pop / pop.sum())
    iid = rng.choice(n_items, len(uid), p=pop) + 1
    _, first = np.unique(uid * (n_items + 1) + iid, return_index=True)
    first = np.sort(first)  # the first draw of each (user, movie), still grouped by user
    u = uid[first]
    rank = np.arange(len(u)) - np.searchsorted(u, u)  # position inside the user's draws
    keep = first[rank < per[u - 1]][:n_ratings]
    uid, iid = uid[keep], iid[keep]
    start = rng.integers(822_873_600, 1_420_070_400, n_users)  # 1996 .. 2015
    span = rng.integers(86_400, 4 * 365 * 86_400, n_users)
    ts = start[uid - 1] + (rng.random(len(uid)) * span[uid - 1]).astype(np.int64)
    rating = (rng.choice(10, len(uid), p=RATING_P / RATING_P.sum()) + 1) / 2
    order = np.lexsort((ts, uid))  # ML-20M's file is sorted by user, then time
    movies = []
    for m in range(1, n_items + 1):
        w = rng.choice(WORDS, 1 + m % 3)
        title = " ".join(w) + (", The" if m % 7 == 0 else "") + f" {m}"
        year = 1920 + m % 95
        k = 1 + rng.choice(10, p=GENRE_COUNT_P)
        gs = "|".join(sorted(rng.choice(GENRES, k, replace=False))) if m % 50 else \
            "(no genres listed)"
        t = f"{title} ({year})"
        movies.append((m, f'"{t}"' if "," in t else t, gs))
    return uid[order], iid[order], rating[order], ts[order], movies


def write(out: Path, n_ratings: int, seed: int = 0) -> int:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    out.mkdir(parents=True, exist_ok=True)
    uid, iid, rating, ts, movies = generate(n_ratings, seed)
    rtext = np.array([f"{r:.1f}" for r in np.arange(0.5, 5.01, 0.5)])
    table = pa.table({"userId": uid, "movieId": iid,
                      "rating": pa.array(rtext[(rating * 2).astype(int) - 1]), "timestamp": ts})
    with open(out / "ratings.csv", "wb") as f:
        f.write(b"userId,movieId,rating,timestamp\n")
        pacsv.write_csv(table, f, pacsv.WriteOptions(quoting_style="none", include_header=False))
    with open(out / "movies.csv", "w", encoding="utf-8") as f:
        f.write("movieId,title,genres\n")
        f.writelines(f"{m},{t},{g}\n" for m, t, g in movies)
    return len(uid)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ratings", type=int, required=True, help="number of ratings")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="generator seed")
    a = p.parse_args()
    n = write(Path(a.out), a.ratings, a.seed)
    print(f"wrote {n} ratings to {a.out}/ratings.csv, movies.csv")


if __name__ == "__main__":
    main()
