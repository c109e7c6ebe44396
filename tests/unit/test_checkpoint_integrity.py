"""Checkpoints are data: tampered files are refused by name and nothing in them runs as code
(resume, warm start and retrain all go through the same checks)."""

from __future__ import annotations

import hashlib
import json
import pickle
from types import SimpleNamespace

import pytest
import torch

from tf4ctr_dist.config import RunConfig
from tf4ctr_dist.distributed.checkpoint import (
    KEY_ENV,
    CheckpointEntry,
    CheckpointIntegrityError,
    CheckpointStore,
)
from tf4ctr_dist.train.resume import Checkpointing, EarlyStopping, Progress


class _WritesMarker:
    """A pickle payload: unpickling it creates the marker file (stands for any code)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _tiny_run(out, cfg):
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    ctx = SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"))
    return Checkpointing(cfg, ctx, model, opt, plan_text="plan"), model


def _saved_run(tmp_path):
    out = tmp_path / "run"
    cfg = RunConfig().with_overrides({"out": str(out)})
    ckpt, model = _tiny_run(out, cfg)
    with torch.no_grad():
        model[0].weight.fill_(0.5)
    progress = Progress(lr=0.1, stopper=EarlyStopping(2), epoch=1, step=0)
    from tf4ctr_dist.train.resume import EpochSums

    ckpt.save(progress, EpochSums(loss=1.5, steps=3, samples=30), None, best=True)
    return out, cfg, out / "checkpoints" / "e0001-s000000"


def _fresh(out, cfg):
    return _tiny_run(out, cfg)[0]


def test_a_clean_checkpoint_round_trips(tmp_path):
    out, cfg, folder = _saved_run(tmp_path)
    index = json.loads((out / "checkpoints" / "index.json").read_text())
    files = index["checkpoints"][0]["files"]
    assert {".metadata", "train_state.json", "rank-00000.pt", "rank-00000.json"} <= set(files)
    assert files[".metadata"] == hashlib.sha256((folder / ".metadata").read_bytes()).hexdigest()
    ckpt, model = _tiny_run(out, cfg)
    sums = ckpt.resume(Progress(lr=0.1, stopper=EarlyStopping(2)), None)
    assert sums.steps == 3 and float(sums.loss) == 1.5
    assert torch.all(model[0].weight == 0.5)
    ckpt2, model2 = _tiny_run(out, cfg)
    ckpt2.warm_start(str(out))  # what retrain --from OUT does
    assert torch.all(model2[0].weight == 0.5)


@pytest.mark.parametrize("victim", [".metadata", "rank-00000.pt", "train_state.json"])
def test_tampered_files_are_refused_by_name_and_never_run(tmp_path, victim):
    out, cfg, folder = _saved_run(tmp_path)
    marker = tmp_path / "PWNED"
    (folder / victim).write_bytes(pickle.dumps(_WritesMarker(str(marker))))
    for attempt in (
        lambda: _fresh(out, cfg).resume(Progress(lr=0.1, stopper=EarlyStopping(2)), None),  # resume
        lambda: _fresh(tmp_path / "other", cfg).warm_start(str(out / "checkpoints")),  # warm start
        lambda: _fresh(tmp_path / "other", cfg).warm_start(str(out)),  # retrain --from OUT
    ):
        with pytest.raises(CheckpointIntegrityError, match=f"e0001-s000000.*{victim}"):
            attempt()
    assert not marker.exists()


def test_a_forged_index_still_cannot_run_code(tmp_path):
    """Whoever can rewrite index.json can match any digest; the pickles still cannot name code."""
    out, cfg, folder = _saved_run(tmp_path)
    marker = tmp_path / "PWNED"
    index_path = out / "checkpoints" / "index.json"
    for victim, why in ((".metadata", "not allowed in checkpoint metadata"), ("rank-00000.pt", "not plain tensors")):
        payload = pickle.dumps(_WritesMarker(str(marker)))
        if victim.endswith(".pt"):
            torch.save({"/rng": _WritesMarker(str(marker))}, folder / victim)
            payload = (folder / victim).read_bytes()
        (folder / victim).write_bytes(payload)
        index = json.loads(index_path.read_text())
        index["checkpoints"][0]["files"][victim] = hashlib.sha256(payload).hexdigest()
        index_path.write_text(json.dumps(index))
        store = CheckpointStore(str(out / "checkpoints"), 0, 1)
        with pytest.raises(CheckpointIntegrityError, match=why):
            if victim == ".metadata":
                store.tensor_shapes(store.latest())
            else:
                store.rank_state(store.latest())
        assert not marker.exists()


def test_hmac_key_authenticates_the_index(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "team-secret")
    out, cfg, folder = _saved_run(tmp_path)
    root = str(out / "checkpoints")
    assert CheckpointStore(root, 0, 1).latest().name == "e0001-s000000"  # own key: fine
    monkeypatch.setenv(KEY_ENV, "another-key")
    with pytest.raises(CheckpointIntegrityError, match="not authenticated.*hmac mismatch"):
        CheckpointStore(root, 0, 1).entries()
    monkeypatch.setenv(KEY_ENV, "team-secret")
    index_path = out / "checkpoints" / "index.json"
    index = json.loads(index_path.read_text())
    del index["hmac"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointIntegrityError, match="no hmac"):
        CheckpointStore(root, 0, 1).entries()


def test_index_names_outside_the_root_are_refused(tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    (root / "index.json").write_text(json.dumps({"checkpoints": [
        {"name": "../../etc", "epoch": 0, "step": 0, "world_size": 1, "files": {}}]}))
    with pytest.raises(CheckpointIntegrityError, match="outside its folder"):
        CheckpointStore(str(root), 0, 1).entries()


def test_a_checkpoint_without_digests_is_refused(tmp_path):
    store = CheckpointStore(str(tmp_path / "c"), 0, 1)
    entry = CheckpointEntry(CheckpointEntry.name_for(0, 1), 0, 1, world_size=1)
    store.save(entry, {"model": {"w": torch.ones(2)}}, {"rng": torch.get_rng_state()}, {"epoch": 0})
    index_path = tmp_path / "c" / "index.json"
    index = json.loads(index_path.read_text())
    index["checkpoints"][0].pop("files")  # as an older version wrote it
    index_path.write_text(json.dumps(index))
    fresh = CheckpointStore(str(tmp_path / "c"), 0, 1)
    with pytest.raises(CheckpointIntegrityError, match="no file digests"):
        fresh.load(fresh.latest(), {"model": {"w": torch.zeros(2)}})
