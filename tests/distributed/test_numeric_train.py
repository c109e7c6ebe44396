"""Numeric fields embedded as value x vector, end to end: `prepare` with `normalizer`, two gloo
workers train weighted twin tables (table-wise fused and data-parallel), the loss falls, and the
exported model scores the raw test CSV exactly as the distributed model scored the prepared rows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

from tests.distributed._launch import run_gloo
from tests.distributed.test_serving_roundtrip import _train_and_predict

HEADER = "label,c,x,m,hist"
SMALL = ["easy_hidden_units=[16]", "hard_hidden_units=[16]", "embedding_dim=8"]


def write_raw(folder, rows=(3000, 600, 600), seed: int = 5) -> tuple[str, str, str]:
    """The label depends mostly on the two numeric columns: a model without their values (or
    with them mis-scaled) does clearly worse. x: ~N(40, 15), some cells empty; m: in [0, 1000]."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for split, n in zip(("train", "valid", "test"), rows):
        c, x, m = rng.integers(0, 12, n), rng.normal(40, 15, n), rng.uniform(0, 1000, n)
        missing = rng.random(n) < 0.08
        z = 2.5 * np.where(missing, 0.0, (x - 40) / 15) - 2.0 * (m / 1000 - 0.5) + 0.6 * (c % 3 == 0)
        y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(int)
        lines = [HEADER]
        for i in range(n):
            hist = "|".join(f"h{j}" for j in rng.integers(0, 6, rng.integers(0, 4)))
            lines.append(f"{y[i]},c{c[i]},{'' if missing[i] else f'{x[i]:.4f}'},{m[i]:.3f},{hist}")
        path = folder / f"{split}.csv"
        path.write_text("\n".join(lines) + "\n")
        paths.append(str(path))
    return tuple(paths)  # type: ignore[return-value]


FIELDS = ["c", {"name": "x", "kind": "numeric", "normalizer": "standard"},
          {"name": "m", "kind": "numeric", "normalizer": "min_max"},
          {"name": "hist", "kind": "sequence", "max_len": 3, "splitter": "|"}]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from data_tools.bars_csv import prepare_bars_csv

    folder = tmp_path_factory.mktemp("numeric")
    raw = write_raw(folder / "raw")
    url = str(folder / "dataset")
    prepare_bars_csv(*raw, url, fields=FIELDS)
    return url, raw


@pytest.mark.parametrize("placement", [
    ["sharding=table_wise", "embedding_optimizer=rowwise_adagrad", "embedding_lr=0.05"],
    ["sharding=data_parallel", "embedding_optimizer=adam", "embedding_lr=0.01"],
], ids=["table_wise", "data_parallel"])
def test_numeric_fields_train_and_serve(dataset, tmp_path, placement):
    from tf4ctr_dist.cli import main
    from tf4ctr_dist.data.manifest import load_manifest
    from tf4ctr_dist.serving import load

    url, (_, _, test_csv) = dataset
    manifest = load_manifest(url)
    assert manifest.numeric_fields == ["x", "m"]
    run = tmp_path / "run"
    overrides = [f"data.url={url}", f"out={run}", "cluster.workers=2", "train.batch_size=256",
                 "train.eval_batch_size=600", "train.epochs=3", "train.monitor=[AUC]", "train.log_every=0",
                 "train.analyses=[]", "model.encoders.first_order=easy", *placement, *SMALL]
    (result, gathered), (result1, _) = run_gloo(_train_and_predict, 2, overrides, timeout=420)
    assert result["test"] == result1["test"]
    history = [h["train_loss"] for h in result["history"]]
    assert history[-1] < history[0], history
    assert result["test"]["AUC"] > 0.75, result["test"]  # the numeric values carry most of the signal
    plan = (run / "plan.txt").read_text()
    for table in ("easy_x", "hard_x", "lr_x", "easy_m"):
        assert f"{table} " in plan and "1 x" in plan.split(f"{table} ", 1)[1].splitlines()[0], table

    reference = np.zeros(manifest.splits["test"].rows)
    for ids, probs in gathered:
        reference[ids] = probs
    artifact = tmp_path / "model.tf4ctr"
    assert main(["export", "--run", str(run), "--out", str(artifact)]) == 0
    scorer = load(str(artifact))
    raw = pacsv.read_csv(test_csv, convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in HEADER.split(",")}))
    # raw values -> (x - shift) / divisor with the saved train statistics -> the same scores
    assert np.abs(scorer.score(raw) - reference).max() <= 1e-6
