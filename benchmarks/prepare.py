"""Scale benchmark of `python -m data_tools prepare criteo`: rows/s and peak RSS.

    python -m benchmarks.prepare --rows 1000000 --out /tmp/bench-prepare
    python -m benchmarks.prepare --rows 10000000 --out /data/bench --engines local,ray --json result.json

1. Writes a Criteo-layout TSV of N rows (label, I1..I13, C1..C26; streamed in chunks; ids drawn
   from power laws over Criteo's raw per-field cardinalities, 8-hex-digit tokens, missing values).
2. Prepares it with the CLI, each run in its own process so its peak RSS is its own (os.wait4):
   to a local folder with every engine asked for, then to s3:// on a moto server that this script
   starts on 127.0.0.1 (tests/s3server.py's, shared with the tests; the server lives in this
   process, so its memory is not in the figures).
3. Checks that all runs wrote the same part files (sha256), prints a table and optionally JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

# Raw distinct values per categorical field in the Criteo Kaggle release (C1..C26).
CRITEO_RAW_CARDINALITY = [
    1460, 583, 10_131_227, 2_202_608, 305, 24, 12_517, 633, 3, 93_145, 5_683, 8_351_593, 3_194,
    27, 14_992, 5_461_306, 10, 5_652, 2_173, 4, 7_046_547, 18, 15, 286_181, 105, 142_572,
]
MISSING_RATE = [0.0, 0.0, 0.03, 0.03, 0.0, 0.12, 0.0, 0.0, 0.0, 0.0, 0.0, 0.03, 0.0, 0.0, 0.0, 0.03,
                0.0, 0.0, 0.44, 0.44, 0.03, 0.0, 0.0, 0.03, 0.44, 0.44]
_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def _power_law(rng: np.random.Generator, n: int, rows: int, a: float = 1.1) -> np.ndarray:
    """0-based ranks in [0, n), density ~ x^-a (the synthetic generator's inverse CDF)."""
    u = rng.random(rows)
    top = float(n + 1)
    x = (1.0 - u * (1.0 - top ** (1.0 - a))) ** (1.0 / (1.0 - a))
    return np.minimum(x.astype(np.int64), n) - 1


def _hex_tokens(values: np.ndarray, missing: np.ndarray) -> pa.Array:
    """uint32 values -> 8-hex-digit strings ("" where missing), vectorised."""
    v = values.astype(np.uint32)
    digits = np.empty((len(v), 8), dtype=np.uint8)
    for i in range(8):
        digits[:, 7 - i] = _HEX[(v >> np.uint32(4 * i)) & np.uint32(15)]
    tokens = pa.array(digits.view("S8").ravel()).cast(pa.string())
    if missing.any():
        tokens = pc.if_else(pa.array(missing), pa.scalar(""), tokens)
    return tokens


def write_criteo_tsv(path: str | Path, rows: int, seed: int = 0, chunk_rows: int = 100_000) -> int:
    """A Criteo-release-layout TSV (no header) of `rows` rows; returns its size in bytes."""
    rng = np.random.default_rng([seed, 0xC12])
    salts = rng.integers(1, 2**32 - 1, size=26, dtype=np.uint64) | np.uint64(1)
    names = ["label"] + [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]
    schema = pa.schema([(n, pa.string()) for n in names])
    options = pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
    with pacsv.CSVWriter(str(path), schema, write_options=options) as writer:
        for start in range(0, rows, chunk_rows):
            n = min(chunk_rows, rows - start)
            r = np.random.default_rng([seed, start // chunk_rows])
            columns: list[pa.Array] = [pa.array((r.random(n) < 0.25).astype(np.int8)).cast(pa.string())]
            for i in range(13):
                ints = np.floor(np.exp(r.normal(1.0 + 0.3 * i, 1.5, n))).astype(np.int64) - (1 if i == 1 else 0)
                text = pa.array(ints).cast(pa.string())
                missing = r.random(n) < (0.02 + 0.05 * (i % 5))
                columns.append(pc.if_else(pa.array(missing), pa.scalar(""), text))
            for j, card in enumerate(CRITEO_RAW_CARDINALITY):
                ranks = _power_law(r, card, n).astype(np.uint64)
                ids = ((ranks + np.uint64(1)) * salts[j] + np.uint64(j)) & np.uint64(0xFFFFFFFF)
                columns.append(_hex_tokens(ids, r.random(n) < MISSING_RATE[j]))
            writer.write_table(pa.Table.from_arrays(columns, schema=schema))
    return os.path.getsize(path)


def _run(argv: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a CLI command in a child process; wall time and that child's peak RSS (MiB)."""
    started = time.monotonic()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.monotonic() - started
    code = os.waitstatus_to_exitcode(status)
    proc.returncode = code
    if code != 0:
        raise SystemExit(f"failed ({code}): {' '.join(argv)}\n{output}")
    return {
        "seconds": round(seconds, 2),
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),  # meaningful on a shared machine
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
        "output": output.strip().splitlines()[-1],
    }


def _report(what: str, run: dict[str, Any], rows: int) -> None:
    print(
        f"{what:>20}: {run['seconds']:8.1f}s wall ({rows / run['seconds']:,.0f} rows/s), "
        f"{run['cpu_seconds']:.1f}s CPU, peak RSS {run['peak_rss_mib']:,.0f} MiB",
        flush=True,
    )


def _shas(manifest_json: str) -> list[str]:
    data = json.loads(manifest_json)
    return [p["sha256"] for split in ("train", "valid", "test") for p in data["splits"][split]["parts"]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--out", required=True, help="work folder (input file and local outputs)")
    p.add_argument("--engines", default="local", help="comma-separated: local,ray")
    p.add_argument("--no-s3", action="store_true", help="skip the s3:// (moto) run")
    p.add_argument("--shard-mb", type=float, help="--engine ray shard size")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to prepare (e.g. vocab_mode=hashed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--keep", action="store_true", help="keep the input and outputs")
    args = p.parse_args(argv)

    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    raw = work / "criteo.tsv"
    results: dict[str, Any] = {"rows": args.rows, "set": args.set, "cpus": os.cpu_count(), "runs": {}}
    started = time.monotonic()
    size = write_criteo_tsv(raw, args.rows, args.seed)
    results["generate"] = {"seconds": round(time.monotonic() - started, 2), "input_mib": round(size / 2**20, 1)}
    print(f"input: {raw} ({size / 2**20:,.1f} MiB, {args.rows:,} rows) in {results['generate']['seconds']}s", flush=True)

    base = [sys.executable, "-m", "data_tools", "prepare", "criteo", "--input", str(raw), "--overwrite"]
    base += list(args.set)  # KEY=VALUE spec overrides
    shas: dict[str, list[str]] = {}
    for engine in [e.strip() for e in args.engines.split(",") if e.strip()]:
        out = work / f"out-{engine}"
        extra = ["--engine", engine] + (["--shard-mb", str(args.shard_mb)] if args.shard_mb and engine == "ray" else [])
        run = _run(base + ["--out", str(out), *extra])
        results["runs"][f"local-folder/{engine}"] = run
        shas[engine] = _shas((out / "manifest.json").read_text())
        _report(f"{engine} -> folder", run, args.rows)

    if not args.no_s3:
        import s3fs

        from tests.s3server import local_s3_server

        with local_s3_server("bench", set_env=False) as server:
            env = dict(os.environ, **server.env)
            run = _run(base + ["--out", server.url("criteo"), "--endpoint-url", server.endpoint_url], env=env)
            results["runs"]["s3-moto/local"] = run
            _report("local -> s3 (moto)", run, args.rows)
            fs = s3fs.S3FileSystem(**server.storage_options)
            shas["s3"] = _shas(fs.cat_file(f"{server.bucket}/criteo/manifest.json"))

    same = len({tuple(v) for v in shas.values()}) <= 1
    results["identical_parts"] = same
    print(f"identical part files across runs: {same}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if not args.keep:
        raw.unlink(missing_ok=True)
        for d in work.glob("out-*"):
            shutil.rmtree(d, ignore_errors=True)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
