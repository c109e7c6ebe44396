"""The checkpoint store in one process: commit protocol, retention, debris, fault specs."""

from __future__ import annotations

import json

import pytest
import torch

from tf4ctr_dist.config import ConfigError, RunConfig
from tf4ctr_dist.distributed.checkpoint import CheckpointEntry, CheckpointStore, materialize_optimizer_state
from tf4ctr_dist.train import faults
from tf4ctr_dist.train.resume import changed_settings


def _save(store: CheckpointStore, epoch: int, step: int, weight: torch.Tensor, best: bool = False, **kw) -> CheckpointEntry:
    entry = CheckpointEntry(CheckpointEntry.name_for(epoch, step), epoch, step, world_size=1, best=best)
    store.save(entry, {"model": {"w": weight}}, {"rng": torch.get_rng_state()}, {"epoch": epoch, "step": step}, **kw)
    return entry


def test_keeps_the_last_k_plus_best_and_loads_values(tmp_path):
    store = CheckpointStore(str(tmp_path / "ckpt"), rank=0, world_size=1, keep=2)
    for i, (epoch, step, best) in enumerate([(0, 5, False), (1, 0, True), (1, 5, False), (2, 0, False), (2, 5, False)]):
        _save(store, epoch, step, torch.full((3, 2), float(i)), best=best)
    names = [e.name for e in CheckpointStore(str(tmp_path / "ckpt"), 0, 1).entries()]
    assert names == ["e0001-s000000", "e0002-s000000", "e0002-s000005"]  # best + last two
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.is_dir()) == names
    fresh = CheckpointStore(str(tmp_path / "ckpt"), 0, 1)
    target = {"model": {"w": torch.zeros(3, 2)}}
    fresh.load(fresh.best(), target)
    assert torch.equal(target["model"]["w"], torch.full((3, 2), 1.0))
    fresh.load(fresh.latest(), target)
    assert torch.equal(target["model"]["w"], torch.full((3, 2), 4.0))
    assert fresh.tensor_shapes(fresh.latest()) == {"model.w": (3, 2)}
    assert fresh.train_state(fresh.latest()) == {"epoch": 2, "step": 5}


def test_a_write_that_dies_before_commit_stays_invisible_and_is_cleared(tmp_path):
    root = tmp_path / "ckpt"
    store = CheckpointStore(str(root), 0, 1)
    _save(store, 0, 4, torch.ones(2))

    class Died(Exception):
        pass

    def die():
        raise Died()

    with pytest.raises(Died):
        _save(store, 0, 8, torch.zeros(2), before_commit=die)
    assert (root / "e0000-s000008").is_dir()  # the data is there ...
    reader = CheckpointStore(str(root), 0, 1)
    assert reader.latest().name == "e0000-s000004"  # ... but not committed
    assert reader.clear_debris() == ["e0000-s000008"]
    assert not (root / "e0000-s000008").exists()
    index = json.loads((root / "index.json").read_text())
    assert [c["name"] for c in index["checkpoints"]] == ["e0000-s000004"]


def test_reset_forgets_everything(tmp_path):
    store = CheckpointStore(str(tmp_path / "c"), 0, 1)
    _save(store, 0, 1, torch.ones(1))
    store.reset()
    assert CheckpointStore(str(tmp_path / "c"), 0, 1).latest() is None
    assert not any(p.is_dir() for p in (tmp_path / "c").iterdir())


def test_a_broken_index_is_a_clear_error(tmp_path):
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(ConfigError, match="index.json is not a checkpoint index"):
        CheckpointStore(str(tmp_path), 0, 1).entries()


def test_materialized_adam_state_leaves_weights_alone():
    p = torch.nn.Parameter(torch.randn(4, 3))
    before = p.detach().clone()
    opt = torch.optim.Adam([p], lr=0.1)
    materialize_optimizer_state([opt])
    assert torch.equal(p.detach(), before) and p.grad is None
    assert set(opt.state[p]) >= {"exp_avg", "exp_avg_sq", "step"} and opt.param_groups[0]["lr"] == 0.1


def test_fault_specs(tmp_path):
    assert faults.parse("step@1:7:1, checkpoint@3:0:0") == [("step", 1, 7, 1), ("checkpoint", 3, 0, 0)]
    with pytest.raises(ValueError, match="POINT@EPOCH:STEP:RANK"):
        faults.parse("step@1:7")
    with pytest.raises(ValueError, match="TF4CTR_FAULTS_DIR"):
        faults.maybe_crash("step", 1, 7, 1, environ={faults.ENV: "step@1:7:1"})
    # A fault already fired (its marker exists) does not fire again; others never match.
    (tmp_path / "step@1:7:1").touch()
    env = {faults.ENV: "step@1:7:1", faults.MARKERS_ENV: str(tmp_path)}
    faults.maybe_crash("step", 1, 7, 1, environ=env)
    faults.maybe_crash("step", 1, 8, 1, environ=env)


def test_changed_settings_lists_what_blocks_a_resume():
    a = RunConfig().to_dict()
    b = RunConfig().with_overrides(["embedding_dim=32", "epochs=7", "batch_size=64"]).to_dict()
    assert changed_settings(a, b) == ["model.embedding_dim: 16 -> 32", "train.batch_size: 10000 -> 64"]
