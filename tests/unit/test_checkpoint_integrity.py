"""Checkpoints are data: tampered files are refused by name and nothing in them runs as code
(resume, warm start and retrain all go through the same checks)."""

from __future__ import annotations

import hashlib
import json
import pickle
from types import SimpleNamespace

import pytest
import torch

from tf4ctr_dist.config import ConfigError, RunConfig
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


def _forge_shard_entry(folder, index_path, fqn: str, payload: bytes, relative_path: str = "__0_0.distcp") -> None:
    """What a writer of the checkpoint root can do without the HMAC key: point one metadata entry
    at pickled bytes (appended to a shard, or any path) and recompute every digest."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    from tf4ctr_dist.distributed.checkpoint import _MetadataUnpickler

    meta = _MetadataUnpickler(open(folder / ".metadata", "rb")).load()
    for key in [k for k in meta.storage_data if k.fqn == fqn]:
        del meta.storage_data[key]
    meta.state_dict_metadata[fqn] = BytesStorageMetadata()
    shard = folder / "__0_0.distcp"
    offset = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(payload)
    meta.storage_data[MetadataIndex(fqn)] = _StorageInfo(relative_path, offset, len(payload))
    (folder / ".metadata").write_bytes(pickle.dumps(meta))
    index = json.loads(index_path.read_text())
    for name in (".metadata", "__0_0.distcp"):
        index["checkpoints"][0]["files"][name] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    index_path.write_text(json.dumps(index))


def test_a_forged_bytes_entry_in_a_shard_cannot_run_code(tmp_path):
    """DCP stores non-tensor values as pickled bytes and by default unpickles them with
    weights_only=False; a rewritten shard + metadata + index must still not run anything, on
    resume and on warm start, and the error names the entry."""
    out, cfg, folder = _saved_run(tmp_path)
    marker = tmp_path / "PWNED"
    _forge_shard_entry(folder, out / "checkpoints" / "index.json", "model.1.num_batches_tracked",
                       pickle.dumps(_WritesMarker(str(marker)), protocol=2))  # torch.save's protocol
    resume = lambda: _fresh(out, cfg).resume(Progress(lr=0.1, stopper=EarlyStopping(2)), None)  # noqa: E731
    with pytest.raises(CheckpointIntegrityError, match=r"'model.1.num_batches_tracked' is not a plain value "
                                                       r"\(Unsupported global"):
        resume()
    assert not marker.exists()
    # a warm start compares the tensor shapes first: the entry is no tensor
    with pytest.raises(ConfigError, match=r"does not fit this model.*1.num_batches_tracked: checkpoint None"):
        _fresh(tmp_path / "other", cfg).warm_start(str(out / "checkpoints"))
    assert not marker.exists()


def test_metadata_may_point_only_at_listed_files(tmp_path):
    out, cfg, folder = _saved_run(tmp_path)
    (tmp_path / "outside.bin").write_bytes(pickle.dumps(7))
    _forge_shard_entry(folder, out / "checkpoints" / "index.json", "model.1.num_batches_tracked",
                       pickle.dumps(7), relative_path="../../../outside.bin")
    store = CheckpointStore(str(out / "checkpoints"), 0, 1)
    with pytest.raises(CheckpointIntegrityError, match=r"points at files index.json does not list: \['../../../outside"):
        store.tensor_shapes(store.latest())


def test_plain_non_tensor_values_still_round_trip(tmp_path):
    """Legitimate non-tensor state (numbers, strings, lists) saved by DCP as bytes loads back."""
    store = CheckpointStore(str(tmp_path / "c"), 0, 1)
    entry = CheckpointEntry(CheckpointEntry.name_for(0, 1), 0, 1, world_size=1)
    saved = {"w": torch.ones(2), "lr": 0.25, "name": "adam", "betas": [0.9, 0.999]}
    store.save(entry, {"model": saved}, {"rng": torch.get_rng_state()}, {"epoch": 0})
    fresh = CheckpointStore(str(tmp_path / "c"), 0, 1)
    state = {"model": {"w": torch.zeros(2), "lr": 0.0, "name": "", "betas": [0.0, 0.0]}}
    fresh.load(fresh.latest(), state)
    assert torch.equal(state["model"]["w"], torch.ones(2))
    assert (state["model"]["lr"], state["model"]["name"], state["model"]["betas"]) == (0.25, "adam", [0.9, 0.999])
