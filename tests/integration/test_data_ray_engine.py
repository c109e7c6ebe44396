"""--engine ray (Ray Data) gives byte-identical datasets to --engine local (same parts and
vocabulary files, same sha256, same manifest), for inputs cut into many shards; errors from
shards keep their messages."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest

from data_tools.bars_csv import prepare_bars_csv
from benchmarks.prepare import write_criteo_tsv
from data_tools.cli import main
from data_tools.criteo import prepare_criteo
from data_tools.engine import RayEngine
from data_tools.parquet_logs import prepare_parquet_logs
from data_tools.synthetic import generate_synthetic
from tests.data_helpers import tiny_bars
from tests.unit.test_data_parquet_logs import SPEC, default_logs
from tf4ctr_dist.data.errors import DataError

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def same_dataset(a: Path, b: Path) -> None:
    assert (a / "manifest.json").read_text() == (b / "manifest.json").read_text()
    files_a = sorted(p.relative_to(a) for p in a.rglob("*.parquet"))
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*.parquet")) and files_a
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_criteo_local_vs_ray_cli(ray_cluster: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[str] = []  # the per-shard work goes through Ray Data
    real_map_batches = ray.data.Dataset.map_batches

    def spy(self: ray.data.Dataset, fn: Any, **kwargs: Any) -> ray.data.Dataset:
        ran.append(kwargs["fn_args"][0].__name__)
        return real_map_batches(self, fn, **kwargs)

    monkeypatch.setattr(ray.data.Dataset, "map_batches", spy)
    raw = tmp_path / "day.tsv"
    write_criteo_tsv(raw, 4000, seed=5, chunk_rows=1000)
    opts = dict(min_count=2, row_group_rows=300, row_groups_per_part=3, field_options={"C3": {"vocab_mode": "hashed", "buckets": 99}})
    prepare_criteo(str(raw), str(tmp_path / "local"), **opts)
    argv = ["prepare", "criteo", "--input", str(raw), "--out", str(tmp_path / "ray"), "--engine", "ray", "--shard-mb", "0.1",
            "--set", "min_count=2", "--set", "row_group_rows=300", "--set", "row_groups_per_part=3",
            "--set", "field_options={C3: {vocab_mode: hashed, buckets: 99}}"]
    assert main(argv) == 0
    assert ray.is_initialized()  # the CLI's engine joined this cluster and left it running
    assert ran == ["count_shard", "transform_shard"]
    same_dataset(tmp_path / "local", tmp_path / "ray")


def test_parquet_logs_synthetic_and_bars_local_vs_ray(ray_cluster: None, tmp_path: Path) -> None:
    engine = RayEngine(shard_bytes=1)  # every row group / chunk its own task
    logs = default_logs(tmp_path / "logs")
    prepare_parquet_logs(str(logs), str(tmp_path / "pl-local"), min_count=2, row_group_rows=20, **SPEC)
    prepare_parquet_logs(str(logs), str(tmp_path / "pl-ray"), min_count=2, row_group_rows=20, engine=engine, **SPEC)
    same_dataset(tmp_path / "pl-local", tmp_path / "pl-ray")

    kwargs = dict(rows=3000, fields=5, vocab_sizes=[10, 50, 200, 5, 1000], seed=2, row_group_rows=256, row_groups_per_part=3)
    generate_synthetic(str(tmp_path / "syn-local"), **kwargs)
    generate_synthetic(str(tmp_path / "syn-ray"), engine=engine, **kwargs)
    same_dataset(tmp_path / "syn-local", tmp_path / "syn-ray")

    files = tiny_bars(tmp_path / "bars")
    prepare_bars_csv(*files, str(tmp_path / "bars-local"), group_col="u", row_group_rows=8)
    prepare_bars_csv(*files, str(tmp_path / "bars-ray"), group_col="u", row_group_rows=8, engine=RayEngine(shard_bytes=64))
    same_dataset(tmp_path / "bars-local", tmp_path / "bars-ray")


def test_numeric_value_fields_local_vs_ray(ray_cluster: None, tmp_path: Path) -> None:
    """Normaliser statistics fit per shard on Ray and merged on the driver: the same bytes."""
    from tests.unit.test_numeric_prepare import NUMERIC_FIELDS, _csvs, _rows

    files = _csvs(tmp_path / "raw", _rows(400, 11), _rows(50, 12))
    prepare_bars_csv(*files, str(tmp_path / "local"), fields=NUMERIC_FIELDS, row_group_rows=64)
    prepare_bars_csv(*files, str(tmp_path / "ray"), fields=NUMERIC_FIELDS, row_group_rows=64,
                     engine=RayEngine(shard_bytes=500))
    same_dataset(tmp_path / "local", tmp_path / "ray")


def test_task_errors_keep_file_and_line(ray_cluster: None, tmp_path: Path) -> None:
    raw = tmp_path / "day.tsv"
    write_criteo_tsv(raw, 1500, seed=6, chunk_rows=500)
    lines = raw.read_text().splitlines()
    lines[1234] = "7" + lines[1234][1:]  # a bad label deep inside a later shard
    raw.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        prepare_criteo(str(raw), str(tmp_path / "ds"), engine=RayEngine(shard_bytes=20_000))
    assert str(info.value).startswith(f"{raw}: line 1235: column 'label' = '7'; expected 0 or 1")
    assert "Traceback" not in str(info.value)
    assert not (tmp_path / "ds").exists()


def test_criteo_folder_of_files_local_vs_ray(ray_cluster: None, tmp_path: Path) -> None:
    days = tmp_path / "days"
    days.mkdir()
    for k, rows in enumerate([1200, 700]):
        write_criteo_tsv(days / f"day_{k}", rows, seed=10 + k, chunk_rows=400)
    opts = dict(min_count=2, row_group_rows=200, row_groups_per_part=2)
    prepare_criteo(str(days), str(tmp_path / "local"), **opts)
    prepare_criteo(str(days), str(tmp_path / "ray"), engine=RayEngine(shard_bytes=60_000), **opts)  # ~3 shards per file
    same_dataset(tmp_path / "local", tmp_path / "ray")
