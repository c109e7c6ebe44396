"""Each dataset format of issue 16 prepared from tiny generated raw files (KKBox, Avazu, MovieLens-1M,
MovieLens tags, Criteo x4 from the raw TSV, a FuxiCTR dataset config), then one epoch of the worker
loop on each in one pair of gloo processes (sequence fields, derived fields, exact/stratified splits)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.distributed._launch import run_gloo
from tests.distributed.test_train_worker import _train
from tests.data_helpers import write_csv


def _kkbox(tmp: Path) -> str:
    from data_tools.bars_sets import prepare_kkbox
    from tests.unit.test_data_bars_sets import KKBOX_HEADER

    rng = np.random.default_rng(0)

    def rows(n: int) -> list[str]:
        return [
            f"{rng.integers(0, 2)},u{rng.integers(0, 20)},s{rng.integers(0, 30)},tab{rng.integers(0, 3)},sc,ty,1,f,7,3,"
            f"{'|'.join(str(g) for g in rng.integers(0, 9, rng.integers(1, 5)))},A|B,TW{rng.integers(0, 9)},{rng.integers(0, 80)}"
            for _ in range(n)
        ]

    files = [write_csv(tmp / f"{s}.csv", KKBOX_HEADER, rows(n)) for s, n in (("train", 600), ("valid", 200), ("test", 200))]
    prepare_kkbox(*files, str(tmp / "ds"))
    return str(tmp / "ds")


def _avazu(tmp: Path) -> str:
    from data_tools.bars_sets import AVAZU_RAW, prepare_avazu

    rng = np.random.default_rng(1)
    rows = [f"{i},{rng.integers(0, 2)},1410{rng.integers(21, 30):02d}{rng.integers(0, 24):02d},"
            + ",".join(f"{c}{rng.integers(0, 4)}" for c in AVAZU_RAW) for i in range(1000)]
    path = write_csv(tmp / "train.csv", "id,click,hour," + ",".join(AVAZU_RAW), rows)
    prepare_avazu([path], str(tmp / "ds"))
    return str(tmp / "ds")


def _ml_1m(tmp: Path) -> str:
    from data_tools.movielens import prepare_movielens
    from tests.unit.test_data_movielens import ratings, write_ml1m

    prepare_movielens(str(write_ml1m(tmp / "ml-1m", ratings(1000))), str(tmp / "ds"))
    return str(tmp / "ds")


def _ml_tag(tmp: Path) -> str:
    from data_tools.bars_sets import prepare_ml_tag

    rng = np.random.default_rng(2)
    rows = [f"{rng.integers(0, 2)},u{rng.integers(0, 30)},i{rng.integers(0, 40)},t{rng.integers(0, 10)}" for _ in range(1000)]
    prepare_ml_tag([write_csv(tmp / "all.csv", "label,user_id,item_id,tag_id", rows)], str(tmp / "ds"))
    return str(tmp / "ds")


def _criteo_x4(tmp: Path) -> str:
    """The x4 path from a raw release TSV: bucketised numerics, stratified 8:1:1 split."""
    from data_tools.criteo import prepare_criteo
    from tests.unit.test_data_criteo_x4 import _raw_tsv

    labels = (np.random.default_rng(3).random(1000) < 0.3).astype(int)
    tmp.mkdir(parents=True, exist_ok=True)
    prepare_criteo(_raw_tsv(tmp / "train.txt", labels), str(tmp / "ds"), split_rule="stratified", min_count=1)
    return str(tmp / "ds")


def _fuxictr(tmp: Path) -> str:
    """A FuxiCTR dataset_config.yaml (Frappe x1 in FuxiCTR's own format) over tiny CSVs."""
    from data_tools.fuxictr import prepare_fuxictr
    from tests.unit.test_data_fuxictr import FUXICTR_YAML, _frappe

    _frappe(tmp)
    (tmp / "dataset_config.yaml").write_text(FUXICTR_YAML)
    prepare_fuxictr(str(tmp / "dataset_config.yaml"), str(tmp / "ds"), dataset_id="frappe_x1", group_col="user")
    return str(tmp / "ds")


FORMATS = {"kkbox": _kkbox, "avazu": _avazu, "ml-1m": _ml_1m, "ml-tag": _ml_tag, "criteo-x4": _criteo_x4,
           "fuxictr": _fuxictr}
SMALL = ["cluster.workers=2", "train.batch_size=256", "train.eval_batch_size=1024", "train.epochs=1",
         "train.monitor=[AUC]", "train.log_every=0", "train.analyses=[]", "easy_hidden_units=[16]",
         "hard_hidden_units=[16]", "embedding_dim=8", "sharding=data_parallel", "embedding_optimizer=adam",
         "checkpoint.enabled=false"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("formats")
    return {name: make(tmp / name) for name, make in FORMATS.items()}


def _train_each(rank: int, world_size: int, urls: dict[str, str], out: str) -> dict:
    """One process group for every format: the worker loop runs once per dataset in turn."""
    return {name: _train(rank, world_size, [f"data.url={url}", f"out={out}/{name}", *SMALL])
            for name, url in urls.items()}


def test_prepare_and_train_one_epoch(prepared: dict[str, str], tmp_path: Path) -> None:
    r0, r1 = run_gloo(_train_each, 2, prepared, str(tmp_path / "run"), timeout=300)
    for name in FORMATS:
        assert r0[name]["valid"] == r1[name]["valid"] and r0[name]["test"] == r1[name]["test"], name
        assert 0.0 <= r0[name]["test"]["AUC"] <= 1.0 and np.isfinite(r0[name]["test"]["logloss"]), name
