"""Progress lines of `prepare`: paced by time, rows going up, a final line per pass, silent
with --quiet, and the percentage / ETA arithmetic (data_tools.progress)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from data_tools import csv_input, progress
from data_tools.bars_csv import prepare_bars_csv
from data_tools.cli import main
from data_tools.engine import LocalEngine
from data_tools.progress import Progress
from tests.data_helpers import write_csv
from tf4ctr_dist.progress import duration, line_seconds

ROWS = re.compile(r"^prepare: (?P<phase>[^:]+(?:: [^:]+)?): (?P<done>done, )?(?P<rows>[\d,]+) rows in ")


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _progress_lines(text: str) -> list[tuple[str, bool, int]]:
    """(phase, final, rows) of every progress line in `text`."""
    found = []
    for line in text.splitlines():
        m = ROWS.match(line)
        if m:
            found.append((m["phase"], bool(m["done"]), int(m["rows"].replace(",", ""))))
    return found


def _bars_input(folder: Path, rows: int) -> None:
    """train/valid/test.csv of a few hundred rows each, so a small CSV block gives many chunks."""
    header = "label,a,b,u"
    for split, n in (("train", rows), ("valid", rows // 4), ("test", rows // 4)):
        write_csv(folder / f"{split}.csv", header, [f"{i % 2},a{i % 7},b{i % 11},u{i % 5}" for i in range(n)])


@pytest.fixture
def every_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """A line at every report (interval 0; stdout under capsys is no terminal), and a small CSV
    block, so a small input still arrives in many chunks."""
    monkeypatch.setattr(progress, "LINE_SECONDS_LOG", 0.0)
    monkeypatch.setattr(csv_input, "BLOCK_SIZE", 1 << 10)


def test_prepare_prints_progress_per_pass_with_rising_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture, every_chunk: None
) -> None:
    _bars_input(tmp_path / "in", 2000)
    out = tmp_path / "ds"
    assert main(["prepare", "bars-csv", "--input", str(tmp_path / "in"), "--out", str(out), "min_count=1"]) == 0
    text = capsys.readouterr().out
    lines = _progress_lines(text)
    phases = {"pass 1/2: counting vocabularies": 2000, "pass 2/2: writing parts": 3000}
    assert [p for p, _, _ in lines if p not in phases] == []
    for phase, total in phases.items():
        running = [rows for p, final, rows in lines if p == phase and not final]
        finals = [rows for p, final, rows in lines if p == phase and final]
        assert len(running) >= 5, text  # one per ~1 KiB chunk
        assert running == sorted(running) and running[0] < running[-1] == total
        assert finals == [total]
    # Passes in order, each one's running lines before its final line.
    assert [final for p, final, _ in lines if p.startswith("pass 1")][-1] is True
    assert lines.index(next(x for x in lines if x[0].startswith("pass 2"))) > max(
        i for i, x in enumerate(lines) if x[0].startswith("pass 1")
    )
    # Local engine, text inputs: input bytes read against the files' total, a percentage, an ETA.
    size = sum((tmp_path / "in" / f"{s}.csv").stat().st_size for s in ("train", "valid", "test"))
    writing = [line for line in text.splitlines() if line.startswith("prepare: pass 2/2") and "done" not in line]
    assert all(re.search(rf"/{size / 1024:.1f} KiB read \(\d+%\)", line) for line in writing), writing
    percents = [int(re.search(r"\((\d+)%\)", line)[1]) for line in writing]  # type: ignore[index]
    assert percents == sorted(percents) and percents[0] < 100 and "ETA" in writing[0]
    # The bytes behind the rows yielded, not the bytes Arrow has read ahead: the percentage
    # follows the rows (the three files' lines are about equally long).
    rows = [rows for p, final, rows in lines if p.startswith("pass 2") and not final]
    assert all(abs(pct - 100 * n / 3000) <= 5 for pct, n in zip(percents, rows)), list(zip(percents, rows))
    assert text.rstrip().splitlines()[-1].startswith(f"wrote {out} in ")


def test_quiet_prints_no_progress(tmp_path: Path, capsys: pytest.CaptureFixture, every_chunk: None) -> None:
    _bars_input(tmp_path / "in", 500)
    argv = ["prepare", "bars-csv", "--input", str(tmp_path / "in"), "min_count=1"]
    assert main([*argv, "--out", str(tmp_path / "loud")]) == 0
    assert _progress_lines(capsys.readouterr().out)  # the same run without --quiet does print
    assert main([*argv, "--out", str(tmp_path / "quiet"), "--quiet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"wrote {tmp_path / 'quiet'} in ")
    assert (tmp_path / "quiet" / "manifest.json").read_bytes() == (tmp_path / "loud" / "manifest.json").read_bytes()


def test_synthetic_reports_rows_of_the_known_total(tmp_path: Path, capsys: pytest.CaptureFixture, every_chunk: None) -> None:
    argv = ["prepare", "synthetic", "--out", str(tmp_path / "s"), "rows=500", "fields=3", "row_group_rows=50"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    lines = _progress_lines(text)
    assert [rows for _, final, rows in lines if not final] == list(range(50, 501, 50))
    assert lines[-1] == ("generating rows", True, 500)
    assert "prepare: generating rows: 250 rows in " in text and ", 50% of 500 rows" in text


class ResultsEngine(LocalEngine):
    """The Ray engine's driver side without Ray: byte-range shards (row counts planned up front)
    whose results come back as whole tables, one per shard."""

    streams = False
    shard_bytes = 1 << 10


def test_results_engine_reports_rows_of_the_planned_total(tmp_path: Path) -> None:
    _bars_input(tmp_path / "in", 600)
    files = [str(tmp_path / "in" / f"{s}.csv") for s in ("train", "valid", "test")]
    lines: list[str] = []
    report = Progress(lines.append, every=0.0)
    manifest = prepare_bars_csv(*files, str(tmp_path / "ds"), min_count=1, engine=ResultsEngine(), progress=report)
    assert {n: i.rows for n, i in manifest.splits.items()} == {"train": 600, "valid": 150, "test": 150}
    counting = [line for line in lines if line.startswith("prepare: pass 1/2") and "done" not in line]
    writing = [line for line in lines if line.startswith("prepare: pass 2/2") and "done" not in line]
    assert len(counting) >= 2 and all("of 600 rows" in line for line in counting)
    assert len(writing) >= 3 and all("of 900 rows" in line for line in writing)
    assert ", 100% of 900 rows, ETA 0s" in writing[-1]
    assert lines[-1].startswith("prepare: pass 2/2: writing parts: done, 900 rows in ")
    # The same dataset as the streaming engine writes.
    local = prepare_bars_csv(*files, str(tmp_path / "local"), min_count=1)
    assert local.splits == manifest.splits


def test_line_format_rate_percent_and_eta_with_a_fake_clock() -> None:
    clock, lines = FakeClock(), []
    p = Progress(lines.append, every=2.0, first=5.0, clock=clock)
    p.start("pass 2/2: writing parts", total=4 << 30, unit="bytes")
    clock.now += 4.0
    p.add(1_000_000, read_bytes=1 << 30)
    assert lines == []  # before the first line is due (5 s)
    clock.now += 1.0
    p.add(200_000, read_bytes=(1 << 30) + (1 << 29))  # 1.5 of 4 GiB after 5 s: 37%, 8.3 s to go
    assert lines == ["prepare: pass 2/2: writing parts: 1,200,000 rows in 5s (240,000 rows/s), 1.5/4.0 GiB read (37%), ETA 8s"]
    clock.now += 1.0
    p.add(240_000)  # not due before 2 s after the last line; bytes kept from the last report
    assert len(lines) == 1 and p.done == (1 << 30) + (1 << 29)
    clock.now += 1.0
    p.add(0, read_bytes=2 << 30)
    assert lines[-1].endswith("(205,714 rows/s), 2.0/4.0 GiB read (50%), ETA 7s")
    clock.now += 63.0
    p.end()
    assert lines[-1] == "prepare: pass 2/2: writing parts: done, 1,440,000 rows in 1m10s (20,571 rows/s)"

    # A new pass counts from zero; its first line comes a gap after the last line.
    p.start("generating rows", total=1000)
    p.add(999)
    assert len(lines) == 3 and ", 99% of 1,000 rows, ETA 0s" in p.line(clock.now)  # floor: not 100% yet
    clock.now += 2.0
    p.add(1)
    assert lines[-1] == "prepare: generating rows: 1,000 rows in 2s (500 rows/s), 100% of 1,000 rows, ETA 0s"
    # Unknown total: rows and rate only; nothing done yet: no ETA.
    p.start("counting", total=None)
    clock.now += 2.0
    p.add(10)
    assert lines[-1] == "prepare: counting: 10 rows in 2s (5 rows/s)"
    p.start("writing", total=10, unit="rows")
    clock.now += 2.0
    p.add(0)
    assert lines[-1] == "prepare: writing: 0 rows in 2s (0 rows/s), 0% of 10 rows"


def test_quick_runs_and_silent_progress_print_nothing() -> None:
    clock, lines = FakeClock(), []
    p = Progress(lines.append, every=2.0, clock=clock)  # first line after min(5 s, every) = 2 s
    p.start("writing parts", total=10)
    clock.now += 1.9
    p.add(10)
    p.end()
    assert lines == []  # done before the first line was due: no final line either
    clock.now += 0.5
    p.add(0)
    assert len(lines) == 1
    silent = Progress.silent()
    silent.emit = lines.append
    silent.add(5)
    silent.end()
    assert len(lines) == 1


def test_pacing_is_sparser_in_logs_than_on_a_terminal() -> None:
    class Stream:
        def __init__(self, tty: bool) -> None:
            self.tty = tty

        def isatty(self) -> bool:
            return self.tty

    assert line_seconds(2.0, 30.0, Stream(True)) == 2.0  # type: ignore[arg-type]
    assert line_seconds(2.0, 30.0, Stream(False)) == 30.0  # type: ignore[arg-type]
    assert [duration(s) for s in (4.4, 75, 3725)] == ["4s", "1m15s", "1h02m"]
