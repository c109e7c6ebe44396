"""`python -m data_tools prepare|check`: exit codes, spec handling, corruption detection."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from data_tools.cli import main
from tests.data_helpers import tiny_bars


def test_prepare_bars_folder_then_check(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tiny_bars(tmp_path / "in")
    spec = tmp_path / "spec.yaml"
    spec.write_text("group_col: u\nmin_count: 2\nrow_group_rows: 16\n")
    out = tmp_path / "ds"
    assert main(["prepare", "bars-csv", "--input", str(tmp_path / "in"), "--out", str(out), "--spec", str(spec)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["group"] == "u" and manifest["spec"]["row_group_rows"] == 16
    assert main(["check", str(out)]) == 0
    assert "OK:" in capsys.readouterr().out
    # Refuses to replace without --overwrite (exit 1, clear message).
    assert main(["prepare", "bars-csv", "--input", str(tmp_path / "in"), "--out", str(out)]) == 1
    assert "already holds a dataset" in capsys.readouterr().err


def test_check_finds_corruption_and_leftovers(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "ds"
    assert main(["prepare", "synthetic", "--out", str(out), "--set", "rows=500", "--set", "fields=3", "--set", "row_group_rows=50"]) == 0
    (out / ".staging-deadbeef").mkdir()
    (out / "train" / "stray.parquet").write_bytes(b"x")
    assert main(["check", str(out), "--quiet"]) == 0  # leftovers are warnings only
    text = capsys.readouterr().out
    assert "leftover staging" in text
    assert "no vocabulary file" not in text  # generated ids have no vocabulary to miss
    part = out / "train" / "part-00000.parquet"
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    assert main(["check", str(out), "--quiet"]) == 1
    text = capsys.readouterr().out
    assert "part-00000.parquet: sha256" in text and "FAILED" in text
    raw = json.loads((out / "manifest.json").read_text())
    raw["fields"][0]["vocab_size"] = 3
    (out / "manifest.json").write_text(json.dumps(raw))
    assert main(["check", str(out), "--quiet"]) == 1
    assert "expected [0, 3)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["prepare", "synthetic", "--out", "X", "--set", "rows=10", "--set", "colour=red"], "unknown spec key(s) for synthetic: ['colour']"),
        (["prepare", "synthetic", "--out", "X"], "needs a row count"),
        (["prepare", "criteo", "--out", "X"], "exactly one --input"),
        (["prepare", "bars-csv", "--input", "a", "--input", "b", "--out", "X"], "three --input files"),
        (["prepare", "synthetic", "--out", "X", "--set", "rows"], "expected KEY=VALUE"),
        (["prepare", "bars-csv", "--input", "IN", "--out", "X", "vocab_mode=hashed"], "needs buckets"),
    ],
)
def test_usage_errors(argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    if "IN" in argv:
        tiny_bars(tmp_path / "in")
    argv = [str(tmp_path / "o") if a == "X" else str(tmp_path / "in") if a == "IN" else a for a in argv]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_unknown_engine_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Parse errors return 2 with one `error:` line (no SystemExit from inside main)."""
    assert main(["prepare", "synthetic", "--out", str(tmp_path / "o"), "--engine", "spark", "--set", "rows=10"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m data_tools prepare: error: ") and "invalid choice: 'spark'" in err[0]


def test_non_utf8_input_is_a_clean_error_in_a_subprocess(tmp_path: Path) -> None:
    """Invalid UTF-8 names the file and line; the CLI exits 1 and a caught library error leaves
    a process that exits cleanly (pyarrow's read-ahead is closed before its file)."""
    import subprocess
    import sys

    folder = tmp_path / "raw"
    folder.mkdir()
    good = b"label,a,b\n1,x,y\n0,x,z\n"
    (folder / "train.csv").write_bytes(b"label,a,b\n1,x,y\n0,\xff\xfe,z\n1,x,y\n")
    (folder / "valid.csv").write_bytes(good)
    (folder / "test.csv").write_bytes(good)
    out = tmp_path / "out"
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-m", "data_tools", "prepare", "bars-csv", "--input", str(folder), "--out", str(out)],
        cwd=repo, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert "train.csv: malformed CSV: line 3 is not valid UTF-8 (byte 3" in proc.stderr, proc.stderr
    assert not (out / "manifest.json").exists()
    # The library call that catches the error must leave a process that exits cleanly.
    script = (
        "from data_tools.bars_csv import prepare_bars_csv\n"
        "from tf4ctr_dist.data.errors import DataError\n"
        f"f = {str(folder)!r}\n"
        "try:\n"
        "    prepare_bars_csv(f + '/train.csv', f + '/valid.csv', f + '/test.csv', f + '/../out2', min_count=1)\n"
        "except DataError as e:\n"
        "    print('refused:', e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=repo, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "refused:" in proc.stdout, (proc.returncode, proc.stderr[-2000:])


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le"])
def test_a_utf16_input_is_refused_at_its_first_line(tmp_path: Path, encoding: str) -> None:
    """UTF-8 allows NUL bytes, so without this check a UTF-16 file (with or without its
    byte-order mark) parses into column names and tokens with a NUL between letters."""
    from data_tools.csv_input import open_text_input
    from tf4ctr_dist.data.errors import DataError

    path = tmp_path / "train.csv"
    path.write_bytes("label,a,b\n1,x,y\n0,x,z\n".encode(encoding))
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}: line 1 has NUL bytes or a UTF-16 byte-order mark; "
                                        r"expected UTF-8 text \(a UTF-16 or binary file\?"):
        open_text_input(str(path))
    path.write_bytes("label,a,b\n1,x,y\n".encode("utf-8-sig"))  # a UTF-8 byte-order mark is fine
    assert open_text_input(str(path)).columns == ["label", "a", "b"]
