"""resolve_placement / fused_params / table_constraints: which sharding, kernel and optimizer
every table gets, and the refusals for what TorchRec / fbgemm cannot run on CPU."""

from __future__ import annotations

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.tbe.config.optimizer_config import WeightDecayMode
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.types import ShardingType

from tf4ctr_dist.distributed.sharding import (
    EmbeddingPlacement,
    ShardingError,
    fused_params,
    resolve_placement,
    table_constraints,
)
from tf4ctr_dist.modules.embedding import field_tables

OPTIMIZERS = ["adam", "adagrad", "rowwise_adagrad", "sgd"]
FUSED = EmbeddingComputeKernel.FUSED.value
DENSE = EmbeddingComputeKernel.DENSE.value
TW, CW, RW, TWRW, DP = (ShardingType.TABLE_WISE.value, ShardingType.COLUMN_WISE.value,
                        ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value,
                        ShardingType.DATA_PARALLEL.value)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_row_wise_on_cpu_is_refused(optimizer: str) -> None:
    with pytest.raises(ShardingError, match="row_wise sharding needs GPUs") as e:
        resolve_placement("row_wise", optimizer, "cpu")
    assert "table_wise" in str(e.value)  # the alternative is named


@pytest.mark.parametrize("sharding", ["table_wise", "column_wise"])
def test_fused_adam_on_cpu_is_refused_with_the_alternatives(sharding: str) -> None:
    with pytest.raises(ShardingError) as e:
        resolve_placement(sharding, "adam", "cpu")
    msg = str(e.value)
    assert f"sharding={sharding}" in msg
    assert "sharding=data_parallel" in msg and "embedding_optimizer=rowwise_adagrad" in msg


def test_sharding_error_is_a_value_error() -> None:
    assert issubclass(ShardingError, ValueError)


def test_auto_on_cpu_with_adam_is_data_parallel_dense() -> None:
    p = resolve_placement("auto", "adam", "cpu")
    assert p == EmbeddingPlacement((DP,), DENSE, "adam", False)
    assert "dense optimizer" in p.describe() and "data_parallel" in p.describe()


@pytest.mark.parametrize("optimizer", ["rowwise_adagrad", "adagrad", "sgd"])
def test_auto_on_cpu_with_a_fused_optimizer(optimizer: str) -> None:
    p = resolve_placement("auto", optimizer, "cpu")
    assert p == EmbeddingPlacement((TW, CW), FUSED, optimizer, True)
    assert RW not in p.sharding_types and TWRW not in p.sharding_types  # no row-wise over gloo
    assert "fused in backward" in p.describe()


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_auto_on_cuda_includes_row_wise(optimizer: str) -> None:
    p = resolve_placement("auto", optimizer, "cuda")
    assert p == EmbeddingPlacement((TW, CW, RW, TWRW), FUSED, optimizer, True)  # adam fused too


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_explicit_data_parallel_is_always_dense(device: str, optimizer: str) -> None:
    assert resolve_placement("data_parallel", optimizer, device) == EmbeddingPlacement((DP,), DENSE, optimizer, False)


@pytest.mark.parametrize(
    "sharding, optimizer, device",
    [("table_wise", "rowwise_adagrad", "cpu"), ("column_wise", "sgd", "cpu"), ("table_wise", "adam", "cuda"),
     ("row_wise", "adam", "cuda"), ("column_wise", "adagrad", "cuda")],
)
def test_explicit_sharding_is_fused(sharding: str, optimizer: str, device: str) -> None:
    assert resolve_placement(sharding, optimizer, device) == EmbeddingPlacement((sharding,), FUSED, optimizer, True)


@pytest.mark.parametrize(
    "optimizer, kind",
    [("adam", EmbOptimType.ADAM), ("adagrad", EmbOptimType.EXACT_ADAGRAD),
     ("rowwise_adagrad", EmbOptimType.EXACT_ROWWISE_ADAGRAD), ("sgd", EmbOptimType.EXACT_SGD)],
)
def test_fused_params_optimizer_and_lr(optimizer: str, kind) -> None:
    p = resolve_placement("table_wise", optimizer, "cuda")
    params = fused_params(p, lr=0.05, weight_decay=0.0)
    assert params["optimizer"] == kind
    assert params["learning_rate"] == 0.05
    assert params["eps"] == 1e-8
    if optimizer == "adam":
        assert (params["beta1"], params["beta2"]) == (0.9, 0.999)
    else:
        assert "beta1" not in params and "beta2" not in params


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_fused_weight_decay_is_l2_only_when_positive(optimizer: str) -> None:
    p = resolve_placement("table_wise", optimizer, "cuda")
    off = fused_params(p, lr=0.01, weight_decay=0.0)
    assert "weight_decay" not in off and "weight_decay_mode" not in off
    on = fused_params(p, lr=0.01, weight_decay=1e-5)
    assert on["weight_decay"] == 1e-5
    assert on["weight_decay_mode"] == WeightDecayMode.L2
    assert {k: v for k, v in on.items() if not k.startswith("weight_decay")} == off


def test_cpu_tables_skip_the_separate_bounds_check_and_the_lookup_still_refuses_bad_ids() -> None:
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import BoundsCheckMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        EmbeddingLocation,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    p = resolve_placement("table_wise", "rowwise_adagrad", "cpu")
    assert fused_params(p, lr=0.05, weight_decay=0.0, device_type="cpu")["bounds_check_mode"] == BoundsCheckMode.NONE
    assert "bounds_check_mode" not in fused_params(p, lr=0.05, weight_decay=0.0, device_type="cuda")
    assert "bounds_check_mode" not in fused_params(p, lr=0.05, weight_decay=0.0)
    params = fused_params(p, lr=0.05, weight_decay=0.0, device_type="cpu")
    tbe = SplitTableBatchedEmbeddingBagsCodegen([(5, 4, EmbeddingLocation.HOST, ComputeDevice.CPU)] * 2, **params)
    with pytest.raises(RuntimeError, match=r"out of bounds: 7, range 0 to 5"):
        tbe(torch.tensor([0, 1, 7, 2]), torch.tensor([0, 1, 2, 3, 4]))


def test_fused_params_are_accepted_by_the_sharder() -> None:
    """The dict is valid EmbeddingBagCollectionSharder input (keys fbgemm's TBE understands)."""
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder

    p = resolve_placement("table_wise", "rowwise_adagrad", "cpu")
    sharder = EmbeddingBagCollectionSharder(fused_params=fused_params(p, lr=0.05, weight_decay=1e-5))
    assert sharder.fused_params["optimizer"] == EmbOptimType.EXACT_ROWWISE_ADAGRAD
    assert sharder.fused_params["weight_decay_mode"] == WeightDecayMode.L2


def test_table_constraints_pin_every_table() -> None:
    tables = field_tables("easy", [("a", 10), ("b", 20)], 4) + field_tables("hard", [("a", 10), ("b", 20)], 8)
    p = resolve_placement("auto", "rowwise_adagrad", "cpu")
    constraints = table_constraints(tables, p)
    assert set(constraints) == {"easy_a", "easy_b", "hard_a", "hard_b"}
    for c in constraints.values():
        assert c.sharding_types == [TW, CW]
        assert c.compute_kernels == [FUSED]
    dp = table_constraints(tables, resolve_placement("auto", "adam", "cpu"))
    assert all(c.sharding_types == [DP] and c.compute_kernels == [DENSE] for c in dp.values())


def test_tables_that_fit_no_plan_are_a_sharding_error_with_the_figures() -> None:
    """A vocabulary far beyond this host's memory: one ShardingError (permanent, so Ray Train does
    not restart for it) naming the memory per worker and the planner's storage figures, instead of
    TorchRec's PlannerError traceback. The planner sees the real host memory (not its 128 GiB)."""
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    from tf4ctr_dist.distributed.sharding import host_memory_bytes, make_sharders, plan_sharding, training_topology

    memory = host_memory_bytes()
    assert memory and training_topology(2, "cpu").devices[0].storage.ddr == memory // 2
    rows = int(memory // (8 * 4)) * 4  # 4x this host's memory at dim 8 in fp32
    tables = field_tables("easy", [("huge", rows)], 8)
    module = torch.nn.Module()
    module.ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
    placement = resolve_placement("table_wise", "rowwise_adagrad", "cpu")
    with pytest.raises(ShardingError, match=r"fit no sharding plan on 1 worker\(s\) with [0-9.]+ GiB of host memory "
                                            r"each.*need 0.0 GB of GPU and [0-9.]+ GB of host memory in all.*"
                                            r"tf4ctr plan --manifest"):
        plan_sharding(module, tables, placement, make_sharders(placement, 0.01, 0.0, "cpu"), 1, "cpu", 64)
