"""`train.sync_batch_norm`: which layers the training assembly converts, and when it refuses.

The maths across ranks is tested with real gloo processes in
tests/distributed/test_cross_worker_batch_norm.py; here: the conversion keeps every parameter and
buffer (same state_dict, same tensors), happens only with several workers, and a model without
BatchNorm refuses the setting instead of silently ignoring it.
"""

from __future__ import annotations

import pytest
import torch

from tf4ctr_dist.config import ConfigError, LossConfig, ModelConfig, RunConfig
from tf4ctr_dist.distributed.batch_norm import CrossWorkerBatchNorm1d
from tf4ctr_dist.model import Objective, TF4CTRTrain, tf4ctr
from tf4ctr_dist.train.setup import apply_sync_batch_norm

FIELDS = [("a", 11), ("b", 7), ("c", 5)]


def _module(**model) -> TF4CTRTrain:
    cfg = ModelConfig(embedding_dim=8, easy_hidden_units=[8], hard_hidden_units=[8, 4], **model)
    return TF4CTRTrain(tf4ctr(FIELDS, cfg, device="meta"), Objective(LossConfig()))


def _kinds(module: torch.nn.Module) -> list[type]:
    return [type(m) for m in module.modules() if isinstance(m, torch.nn.BatchNorm1d)]


def test_the_setting_is_a_train_key_off_by_default():
    assert RunConfig().train.sync_batch_norm is False
    assert RunConfig().with_overrides(["sync_batch_norm=true"]).train.sync_batch_norm is True


def test_several_workers_convert_every_batch_norm_and_keep_its_tensors():
    module = _module()
    before = module.state_dict(keep_vars=True)
    assert len(_kinds(module)) == 3
    cfg = RunConfig().with_overrides(["train.sync_batch_norm=true"])
    assert apply_sync_batch_norm(cfg, module, world_size=2) == 3
    assert _kinds(module) == [CrossWorkerBatchNorm1d] * 3
    after = module.state_dict(keep_vars=True)
    assert list(after) == list(before)
    assert all(after[k] is before[k] for k in before)  # the same tensors, not copies


@pytest.mark.parametrize("overrides, world", [([], 2), (["train.sync_batch_norm=true"], 1)])
def test_off_or_one_worker_leaves_the_model_alone(overrides, world):
    module = _module()
    assert apply_sync_batch_norm(RunConfig().with_overrides(overrides), module, world_size=world) == 0
    assert _kinds(module) == [torch.nn.BatchNorm1d] * 3


def test_a_model_without_batch_norm_refuses_the_setting():
    module = _module(batch_norm=False)
    assert _kinds(module) == []
    with pytest.raises(ConfigError, match=r"sync_batch_norm=true.*no BatchNorm layer"):
        apply_sync_batch_norm(RunConfig().with_overrides(["train.sync_batch_norm=true"]), module, world_size=2)


def test_without_a_process_group_the_layer_is_batch_norm():
    torch.manual_seed(0)
    plain = torch.nn.BatchNorm1d(4, momentum=0.2)
    cross = CrossWorkerBatchNorm1d(4, momentum=0.2)
    x = torch.randn(9, 4) * 2 + 1
    torch.testing.assert_close(cross(x), plain(x), rtol=0, atol=0)
    torch.testing.assert_close(cross.running_var, plain.running_var, rtol=0, atol=0)
