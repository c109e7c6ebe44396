"""Synthetic industrial click logs in daily partitions, for retraining drills.

    python -m data_tools.daily_logs --out URL --start 2026-11-20 --days 7 --rows-per-day 200000

writes ``URL/dt=YYYY-MM-DD/part-00000.parquet`` with columns ``click`` (0/1), ``user_id`` and
``f1..fN``: raw 64-bit ids as strings, the way a logging pipeline emits them. Each field draws
ids from a power law over popularity ranks; every day a share ``churn`` of the ranks (picked at
random, popular ones included) is taken over by ids never seen before. So each new day brings
new ids, and a model that saw more days knows more of the ids it meets. Labels come
from a fixed hidden logistic teacher over the ids. Prepare the partitions with the
``parquet-logs`` converter and hashed vocabularies (``vocab_mode: hashed``), whose table sizes do
not depend on the days, so yesterday's model fits today's dataset.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tf4ctr_dist.data.storage import resolve

from .synthetic import bias_for_rate, power_law_ranks


def generate_daily_logs(
    out_url: str,
    *,
    start: str = "2026-11-20",
    days: int = 7,
    rows_per_day: int = 100_000,
    fields: int = 8,
    head: int = 5_000,
    churn: float = 0.1,
    power_law: float = 1.2,
    positive_rate: float = 0.25,
    seed: int = 0,
    storage_options: Optional[dict] = None,
) -> list[str]:
    """Write ``days`` partitions; returns their dates. Field i has ``head * (1 + i % 3)`` ids in
    use on any day; ``churn`` of them are new each day."""
    if days < 1 or rows_per_day < 1 or fields < 1:
        raise ValueError("days, rows_per_day and fields must be >= 1")
    loc = resolve(out_url, storage_options)
    rng = np.random.default_rng([seed, 0xDA11])
    sizes = [head * (1 + i % 3) for i in range(fields)]
    step = [int(churn * n) for n in sizes]
    universe = [n + s * days for n, s in zip(sizes, step)]  # every id any day can draw
    in_use = [np.arange(n) for n in sizes]  # popularity rank -> index into the universe
    weights = [rng.normal(0.0, rng.uniform(0.3, 1.0), u) for u in universe]
    raw_ids = [rng.integers(1, 2**62, u, dtype=np.int64) for u in universe]  # opaque ids as logged
    users = 1 + 20 * head
    user_weight = rng.normal(0.0, 0.5, users)
    first = dt.date.fromisoformat(start)
    dates = []
    bias = None
    for d in range(days):
        day_rng = np.random.default_rng([seed, d])
        cols, logit = {}, np.zeros(rows_per_day)
        user = power_law_ranks(day_rng.random(rows_per_day), users, 1.05)
        logit += user_weight[user]
        for i, (n, s) in enumerate(zip(sizes, step)):
            if d > 0 and s:  # fresh ids take over random ranks
                slots = day_rng.choice(n, size=s, replace=False)
                in_use[i][slots] = n + (d - 1) * s + np.arange(s)
            idx = in_use[i][power_law_ranks(day_rng.random(rows_per_day), n, power_law)]
            logit += weights[i][idx]
            cols[f"f{i + 1}"] = raw_ids[i][idx].astype(str)
        logit = (logit - logit.mean()) / max(logit.std(), 1e-9) * 1.5
        if bias is None:  # fixed from day 0, so later days' click rates drift with their ids
            bias = bias_for_rate(logit, positive_rate)
        click = (day_rng.random(rows_per_day) < 1 / (1 + np.exp(-(logit + bias)))).astype(np.int8)
        table = pa.table({"click": click, "user_id": user.astype(np.int64), **cols})
        date = (first + dt.timedelta(days=d)).isoformat()
        path = loc.path(f"dt={date}", "part-00000.parquet")
        loc.makedirs(loc.path(f"dt={date}"))
        buf = io.BytesIO()
        pq.write_table(table, buf, row_group_size=max(1, min(rows_per_day, 50_000)))
        with loc.fs.open(f"{path}.tmp", "wb") as f:
            f.write(buf.getvalue())
        loc.fs.mv(f"{path}.tmp", path)
        dates.append(date)
        print(f"[daily_logs] {loc.url_of(f'dt={date}')}: {rows_per_day:,} rows, click rate {click.mean():.3f}", flush=True)
    return dates


def spec_for(fields: int, train_dates: list[str], valid_dates: list[str], test_dates: list[str],
             buckets: int = 50_000) -> dict:
    """A parquet-logs dataset spec for these logs: hashed vocabularies of fixed size."""
    return {
        "label": "click",
        "group": "user_id",
        "train_dates": train_dates,
        "valid_dates": valid_dates,
        "test_dates": test_dates,
        "vocab_mode": "hashed",
        "buckets": buckets,
        "fields": ["user_id", *[f"f{i + 1}" for i in range(fields)]],
    }


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m data_tools.daily_logs", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder or URL for the dt=... partitions")
    p.add_argument("--start", default="2026-11-20", help="first date (YYYY-MM-DD)")
    p.add_argument("--days", type=int, default=7)
    p.add_argument("--rows-per-day", type=int, default=100_000)
    p.add_argument("--fields", type=int, default=8)
    p.add_argument("--churn", type=float, default=0.1, help="share of each field's popular ids replaced per day")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--spec-out", metavar="FILE", help="also write a parquet-logs spec (YAML) for these logs: hashed "
                   "vocabularies, train on the first days, valid and test on the two after them (retrain's "
                   "--train/--valid/--test-dates replace the dates)")
    args = p.parse_args(argv)
    if args.spec_out and args.days < 3:
        p.error("--spec-out needs --days >= 3 (train, valid and test dates)")
    dates = generate_daily_logs(args.out, start=args.start, days=args.days, rows_per_day=args.rows_per_day,
                                fields=args.fields, churn=args.churn, seed=args.seed)
    if args.spec_out:
        import yaml

        train = dates[:max(1, min(3, len(dates) - 2))]
        spec = spec_for(args.fields, train, [dates[len(train)]], [dates[len(train) + 1]])
        with open(args.spec_out, "w") as f:
            yaml.safe_dump(spec, f, sort_keys=False)
        print(f"wrote {args.spec_out}: train {train[0]}..{train[-1]}, valid {dates[len(train)]}, "
              f"test {dates[len(train) + 1]}")


if __name__ == "__main__":
    main()
