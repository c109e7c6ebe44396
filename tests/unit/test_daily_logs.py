"""Synthetic daily click logs: layout, determinism, and the promised share of new ids per day."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from data_tools.daily_logs import generate_daily_logs, spec_for


def test_partitions_are_deterministic_and_bring_new_ids(tmp_path):
    kw = dict(start="2026-11-20", days=3, rows_per_day=20_000, fields=2, head=400, churn=0.1, seed=3)
    dates = generate_daily_logs(str(tmp_path / "a"), **kw)
    generate_daily_logs(str(tmp_path / "b"), **kw)
    assert dates == ["2026-11-20", "2026-11-21", "2026-11-22"]
    days = [pq.read_table(tmp_path / "a" / f"dt={d}" / "part-00000.parquet") for d in dates]
    again = pq.read_table(tmp_path / "b" / f"dt={dates[1]}" / "part-00000.parquet")
    assert days[1].equals(again)
    assert days[0].column_names == ["click", "user_id", "f1", "f2"]
    assert set(np.unique(days[0]["click"].to_numpy())) == {0, 1}
    # f1 has 400 ids in use per day; 40 ranks a day go to ids never seen before.
    seen = set(days[0]["f1"].to_pylist())
    assert len(seen) <= 400
    fresh = set(days[1]["f1"].to_pylist()) - seen
    assert 10 <= len(fresh) <= 40


def test_spec_uses_hashed_vocabularies(tmp_path):
    spec = spec_for(2, ["2026-11-20"], ["2026-11-21"], ["2026-11-22"], buckets=1000)
    assert spec["vocab_mode"] == "hashed" and spec["buckets"] == 1000
    assert spec["fields"] == ["user_id", "f1", "f2"] and spec["label"] == "click"


def test_the_command_writes_a_spec_that_prepare_takes(tmp_path, capsys):
    """README's retraining walk-through: logs + spec, then `prepare parquet-logs` with that spec."""
    import yaml

    from data_tools.cli import main as data_main
    from data_tools.daily_logs import main

    main(["--out", str(tmp_path / "logs"), "--days", "5", "--rows-per-day", "2000", "--fields", "2",
          "--spec-out", str(tmp_path / "spec.yaml")])
    spec = yaml.safe_load((tmp_path / "spec.yaml").read_text())
    assert spec["train_dates"] == ["2026-11-20", "2026-11-21", "2026-11-22"]
    assert (spec["valid_dates"], spec["test_dates"]) == (["2026-11-23"], ["2026-11-24"])
    assert spec["vocab_mode"] == "hashed" and spec["fields"] == ["user_id", "f1", "f2"]
    assert data_main(["prepare", "parquet-logs", "--input", str(tmp_path / "logs"), "--out", str(tmp_path / "ds"),
                      "--spec", str(tmp_path / "spec.yaml")]) == 0, capsys.readouterr().err
    assert (tmp_path / "ds" / "manifest.json").exists()
