"""BatchNorm over the global batch across gloo ranks (`train.sync_batch_norm`).

Layer: two ranks, each holding some rows of one batch (unequal counts), must give what one
nn.BatchNorm1d gives on all the rows: the same outputs, the same input gradients of the summed
loss, per-rank weight/bias gradients that add up to the whole batch's, and the same running
statistics; for (B, C) and (B, C, L) inputs. Evaluation uses the running statistics.

Kernel block: with the compiled CPU kernels the MLP blocks run Linear -> BatchNorm -> ReLU ->
dropout as a matmul and the kernel in halves around the layer's pooling; two ranks must give what
the plain modules give on all the rows, and with dropout the masks of the eager ops.

Model: two ranks train TF4CTR (BatchNorm in every tower, dropout 0, data-parallel tables and
Adam) through DistributedModelParallel and TrainPipelineSparseDist, as the worker loop does, on
the halves of the global batches, with the compiled CPU kernels loaded (the pooled kernel path)
and without (the layer's eager ops). With the layers converted, every weight and running
statistic must equal one process training the whole batch; without, they must not (the per-rank
statistics of 8 rows differ from those of 16), which shows the comparison is sharp enough to tell.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed._launch import run_gloo
from tests.distributed.test_dense_tables import (
    EMB_LR, FIELDS, GLOBAL_BATCH, LR, _global_batches, _load, _make_batch, _state_of,
)

ROWS = [5, 7]  # rows per rank in the layer test: unequal, so the counts must be reduced too
CHANNELS = 6


def _layer_inputs(shape_tail: tuple[int, ...]) -> dict:
    g = torch.Generator().manual_seed(3)
    n = sum(ROWS)
    x = torch.randn((n, CHANNELS, *shape_tail), generator=g) * 3.0 + 1.5
    return {"x": x, "upstream": torch.randn(x.shape, generator=g), "weight": torch.rand(CHANNELS, generator=g) + 0.5,
            "bias": torch.randn(CHANNELS, generator=g)}


def _reference_layer(inputs: dict, steps: int = 2) -> dict:
    bn = torch.nn.BatchNorm1d(CHANNELS, momentum=0.3)
    with torch.no_grad():
        bn.weight.copy_(inputs["weight"])
        bn.bias.copy_(inputs["bias"])
    for _ in range(steps):  # two steps: the running statistics compound the momentum
        bn.zero_grad()
        x = inputs["x"].clone().requires_grad_(True)
        y = bn(x)
        (y * inputs["upstream"]).sum().backward()
    bn.eval()
    return {"y": y.detach(), "grad_x": x.grad, "grad_weight": bn.weight.grad, "grad_bias": bn.bias.grad,
            "running_mean": bn.running_mean.clone(), "running_var": bn.running_var.clone(),
            "eval": bn(inputs["x"]).detach(), "tracked": int(bn.num_batches_tracked)}


def _rank_layer(rank: int, world: int, inputs: dict, steps: int = 2) -> dict:
    from tf4ctr_dist.distributed.batch_norm import CrossWorkerBatchNorm1d, use_cross_worker_batch_norm

    holder = torch.nn.Sequential(torch.nn.BatchNorm1d(CHANNELS, momentum=0.3))
    assert use_cross_worker_batch_norm(holder) == 1
    bn = holder[0]
    assert isinstance(bn, CrossWorkerBatchNorm1d)
    with torch.no_grad():
        bn.weight.copy_(inputs["weight"])
        bn.bias.copy_(inputs["bias"])
    lo = sum(ROWS[:rank])
    rows = slice(lo, lo + ROWS[rank])
    for _ in range(steps):
        bn.zero_grad()
        x = inputs["x"][rows].clone().requires_grad_(True)
        y = bn(x)
        (y * inputs["upstream"][rows]).sum().backward()
    bn.eval()
    return {"y": y.detach().numpy().copy(), "grad_x": x.grad.numpy().copy(),
            "grad_weight": bn.weight.grad.numpy().copy(), "grad_bias": bn.bias.grad.numpy().copy(),
            "running_mean": bn.running_mean.numpy().copy(), "running_var": bn.running_var.numpy().copy(),
            "eval": bn(inputs["x"]).detach().numpy().copy(), "tracked": int(bn.num_batches_tracked)}


def _layer_cases(rank: int, world: int, cases: dict) -> dict:
    return {name: _rank_layer(rank, world, inputs) for name, inputs in cases.items()}


@pytest.fixture(scope="module")
def layer_runs():
    cases = {"2d": _layer_inputs(()), "3d": _layer_inputs((4,))}
    return cases, run_gloo(_layer_cases, 2, cases, timeout=120)


@pytest.mark.parametrize("case", ["2d", "3d"])
def test_layer_equals_batch_norm_on_all_rows(layer_runs, case):
    cases, ranks = layer_runs
    ref = _reference_layer(cases[case])
    close = dict(atol=2e-6, rtol=1e-5)
    for rank, got in enumerate(ranks):
        lo = sum(ROWS[:rank])
        rows = slice(lo, lo + ROWS[rank])
        got = {k: torch.as_tensor(v) for k, v in got[case].items()}
        torch.testing.assert_close(got["y"], ref["y"][rows], **close)
        torch.testing.assert_close(got["grad_x"], ref["grad_x"][rows], **close)
        for key in ("running_mean", "running_var", "eval"):
            torch.testing.assert_close(got[key], ref[key], **close, msg=lambda m: f"{key}: {m}")
        assert int(got["tracked"]) == ref["tracked"]
    for key in ("grad_weight", "grad_bias"):  # local sums; data parallelism adds (averages) them
        total = sum(torch.as_tensor(r[case][key]) for r in ranks)
        torch.testing.assert_close(total, ref[key], **close, msg=lambda m: f"{key}: {m}")
    # Sharp enough to tell: rank 0's rows normalised on their own are far from the global result.
    local = torch.nn.functional.batch_norm(cases[case]["x"][: ROWS[0]], None, None, cases[case]["weight"],
                                           cases[case]["bias"], training=True)
    assert (local - ref["y"][: ROWS[0]]).abs().max() > 0.05


# ---- the compiled kernel's block ------------------------------------------------------------------

BLOCK_ROWS = [37, 50]  # unequal, and more than a 32-row block of the kernel's sums on each rank
BLOCK_IN, BLOCK_OUT = 5, 7


def _block_inputs() -> dict:
    g = torch.Generator().manual_seed(11)
    n = sum(BLOCK_ROWS)
    return {"x": torch.randn(n, BLOCK_IN, generator=g) * 2.0 + 0.5,
            "upstream": torch.randn(n, BLOCK_OUT, generator=g),
            "state": {k: v for k, v in _plain_block(seed=5).state_dict().items()}}


def _plain_block(seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    block = torch.nn.Sequential(torch.nn.Linear(BLOCK_IN, BLOCK_OUT), torch.nn.BatchNorm1d(BLOCK_OUT, momentum=0.3))
    with torch.no_grad():
        block[0].bias.normal_()  # a shift in front of BatchNorm: it must move the running mean only
        block[1].weight.uniform_(0.5, 1.5)
        block[1].bias.normal_()
    return block


def _reference_block(inputs: dict, steps: int = 2) -> dict:
    block = _plain_block(seed=5)
    block.load_state_dict(inputs["state"])
    for _ in range(steps):
        block.zero_grad()
        x = inputs["x"].clone().requires_grad_(True)
        y = torch.relu(block(x))
        (y * inputs["upstream"]).sum().backward()
    return {"y": y.detach(), "grad_x": x.grad, "linear_weight": block[0].weight.grad,
            "bn_weight": block[1].weight.grad, "bn_bias": block[1].bias.grad,
            "running_mean": block[1].running_mean.clone(), "running_var": block[1].running_var.clone()}


def _rank_block(rank: int, inputs: dict, kernels, dropout: float, steps: int = 2) -> dict:
    from tf4ctr_dist.distributed.batch_norm import use_cross_worker_batch_norm
    from tf4ctr_dist.modules.mlp import linear_batch_norm_relu_dropout

    block = _plain_block(seed=5)
    block.load_state_dict(inputs["state"])
    assert use_cross_worker_batch_norm(block) == 1
    lo = sum(BLOCK_ROWS[:rank])
    rows = slice(lo, lo + BLOCK_ROWS[rank])
    torch.manual_seed(100 + rank)  # the dropout stream: the same for the kernel and the eager ops
    for _ in range(steps):
        block.zero_grad()
        x = inputs["x"][rows].clone().requires_grad_(True)
        y = linear_batch_norm_relu_dropout(x, block[0], block[1], dropout, True, kernels)
        (y * inputs["upstream"][rows]).sum().backward()
    return {"y": y.detach().numpy().copy(), "grad_x": x.grad.numpy().copy(),
            "linear_weight": block[0].weight.grad.numpy().copy(), "bn_weight": block[1].weight.grad.numpy().copy(),
            "bn_bias": block[1].bias.grad.numpy().copy(), "running_mean": block[1].running_mean.numpy().copy(),
            "running_var": block[1].running_var.numpy().copy(), "tracked": int(block[1].num_batches_tracked)}


def _block_cases(rank: int, world: int, inputs: dict) -> dict:
    from tf4ctr_dist.kernels import load
    from tf4ctr_dist.kernels.ops import PooledBatchNormReLUDropout

    kernels = load("on")
    calls = []
    original = PooledBatchNormReLUDropout.forward

    def counted(*args):
        calls.append(1)
        return original(*args)

    PooledBatchNormReLUDropout.forward = staticmethod(counted)  # this test process only
    try:
        out = {"kernel": _rank_block(rank, inputs, kernels, 0.0),
               "kernel_dropout": _rank_block(rank, inputs, kernels, 0.3)}
    finally:
        PooledBatchNormReLUDropout.forward = staticmethod(original)
    out["eager_dropout"] = _rank_block(rank, inputs, None, 0.3)
    out["kernel_calls"] = len(calls)
    return out


@pytest.fixture(scope="module")
def block_runs():
    inputs = _block_inputs()
    return inputs, run_gloo(_block_cases, 2, inputs, timeout=120)


def test_kernel_block_equals_plain_modules_on_all_rows(block_runs):
    inputs, ranks = block_runs
    ref = _reference_block(inputs)
    close = dict(atol=1e-5, rtol=1e-5)
    assert all(r["kernel_calls"] == 4 for r in ranks)  # 2 cases x 2 steps: the pooled kernel ran
    for rank, result in enumerate(ranks):
        got = {k: torch.as_tensor(v) for k, v in result["kernel"].items()}
        lo = sum(BLOCK_ROWS[:rank])
        rows = slice(lo, lo + BLOCK_ROWS[rank])
        torch.testing.assert_close(got["y"], ref["y"][rows], **close)
        torch.testing.assert_close(got["grad_x"], ref["grad_x"][rows], **close)
        for key in ("running_mean", "running_var"):  # the Linear's bias moves the running mean
            torch.testing.assert_close(got[key], ref[key], **close, msg=lambda m: f"{key}: {m}")
        assert got["tracked"] == 2
    for key in ("linear_weight", "bn_weight", "bn_bias"):  # local sums; data parallelism adds them
        total = sum(torch.as_tensor(r["kernel"][key]) for r in ranks)
        torch.testing.assert_close(total, ref[key], **close, msg=lambda m: f"{key}: {m}")
    # every rank holds the same running statistics, to the bit (the pooled moments are combined
    # in rank order on every rank)
    for key in ("running_mean", "running_var"):
        assert (ranks[0]["kernel"][key] == ranks[1]["kernel"][key]).all()


def test_kernel_block_with_dropout_equals_the_eager_ops(block_runs):
    """With dropout, the pooled kernel keeps the entries the layer's eager ops keep (the same
    generator) and computes the same function of them."""
    _, ranks = block_runs
    for result in ranks:
        kernel, eager = result["kernel_dropout"], result["eager_dropout"]
        assert ((kernel["y"] == 0) == (eager["y"] == 0)).all()
        for key in ("y", "grad_x", "linear_weight", "bn_weight", "bn_bias", "running_mean", "running_var"):
            torch.testing.assert_close(torch.as_tensor(kernel[key]), torch.as_tensor(eager[key]), atol=1e-5,
                                       rtol=1e-5, msg=lambda m: f"{key}: {m}")
        # and dropout did drop: the case differs from the one without
        assert (result["kernel_dropout"]["y"] == 0).mean() > (result["kernel"]["y"] == 0).mean() + 0.15


# ---- the model ----------------------------------------------------------------------------------

STEPS = 3


def _model_cfg():
    from tf4ctr_dist.config import ModelConfig

    return ModelConfig(embedding_dim=8, ssem="ser", dfm="wsf", easy_hidden_units=[8], hard_hidden_units=[8, 6],
                       net_dropout=0.0, batch_norm=True)


def _reference_model():
    from tf4ctr_dist.config import LossConfig
    from tf4ctr_dist.model import Objective, TF4CTRTrain, tf4ctr

    torch.manual_seed(77)
    ref = TF4CTRTrain(tf4ctr(FIELDS, _model_cfg(), device="cpu"), Objective(LossConfig()))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "embedding_bags" in name:
                p.copy_(torch.randn(p.shape) * 0.3)
    return ref


def _reference_train(init: dict, batches: list[dict]) -> dict:
    """One process, the whole global batch, torch.optim.Adam (dense LR, tables EMB_LR)."""
    ref = _reference_model()
    ref.load_state_dict(init)
    assert _hold_pre_batch_norm_biases(ref) >= 3
    named = list(ref.named_parameters())
    emb = [p for n, p in named if "embedding_bags" in n]
    dense = [p for n, p in named if "embedding_bags" not in n]
    opt = torch.optim.Adam([{"params": dense, "lr": LR}, {"params": emb, "lr": EMB_LR}], lr=LR)
    losses = []
    for data in batches:
        opt.zero_grad()
        loss, _ = ref(_make_batch(data, 0, GLOBAL_BATCH))
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return {"state": {k: v.detach().clone() for k, v in ref.state_dict().items()}, "losses": losses}


def _rank_train(rank: int, world: int, init: dict, batches: list[dict], convert: bool, kernels: bool = True) -> dict:
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    from tf4ctr_dist.config import LossConfig
    from tf4ctr_dist.distributed.batch_norm import use_cross_worker_batch_norm
    from tf4ctr_dist.distributed.sharding import build_optimizer, resolve_placement, shard_model
    from tf4ctr_dist.kernels import load
    from tf4ctr_dist.model import Objective, TF4CTRTrain, embedding_tables, tf4ctr

    # With the compiled BatchNorm kernel loaded, converted layers run it in halves around the
    # pooling; without, their eager ops.
    module = TF4CTRTrain(tf4ctr(FIELDS, _model_cfg(), device="meta", cpu_kernels=load("on" if kernels else "off")),
                         Objective(LossConfig()))
    converted = use_cross_worker_batch_norm(module) if convert else 0
    dmp, _ = shard_model(module, embedding_tables(FIELDS, _model_cfg()),
                         resolve_placement("data_parallel", "adam", "cpu"), device=torch.device("cpu"),
                         embedding_lr=EMB_LR, embedding_weight_decay=0.0, local_batch_size=GLOBAL_BATCH // world)
    optimizer = build_optimizer(dmp, lr=LR, embedding_lr=EMB_LR, emb_reg=0.0, emb_reg_mode="full",
                                clip_grad_norm=1e9)
    _load(dmp, init)
    assert _hold_pre_batch_norm_biases(dmp) >= 3
    eager_calls = []  # the layers' own forward runs only where the kernel does not
    for layer in dmp.modules():
        if isinstance(layer, torch.nn.BatchNorm1d):
            layer.register_forward_hook(lambda *_: eager_calls.append(1))
    half = GLOBAL_BATCH // world
    pipe = TrainPipelineSparseDist(dmp, optimizer, torch.device("cpu"), execute_all_batches=True)
    it = iter([_make_batch(data, rank * half, (rank + 1) * half) for data in batches])
    losses = []
    while True:
        try:
            loss, _, _, _ = pipe.progress(it)
        except StopIteration:
            break
        losses.append(float(loss))
    return {"state": _state_of(dmp), "losses": losses, "converted": converted,
            "pipelined": len(pipe._pipelined_modules), "eager_calls": len(eager_calls)}


def _model_cases(rank: int, world: int, init: dict, batches: list[dict]) -> dict:
    from tf4ctr_dist.train.loop import quiet_library_logs

    quiet_library_logs()
    return {"global": _rank_train(rank, world, init, batches, True),
            "global_eager": _rank_train(rank, world, init, batches, True, kernels=False),
            "local": _rank_train(rank, world, init, batches, False)}


@pytest.fixture(scope="module")
def model_runs():
    from tf4ctr_dist.train.loop import quiet_library_logs

    quiet_library_logs()
    init = {k: v.detach().clone() for k, v in _reference_model().state_dict().items()}
    batches = _global_batches(STEPS, seed=8)
    ref = _reference_train(init, batches)
    ranks = run_gloo(_model_cases, 2, {k: v.numpy() for k, v in init.items()}, batches, timeout=300)
    return init, ref, ranks


def _hold_pre_batch_norm_biases(model: torch.nn.Module) -> int:
    """Zero the gradient of every Linear bias that feeds a BatchNorm; returns how many.

    Its exact gradient is 0 (BatchNorm subtracts it again), so what reaches it is float noise,
    which Adam turns into steps of about lr in either direction: harmless to the function, but
    it would move the running means differently in the two runs compared (the compiled kernel
    gives these biases an exact 0 for this reason)."""
    held = 0
    for seq in model.modules():
        if isinstance(seq, torch.nn.Sequential):
            for first, second in zip(seq, list(seq)[1:]):
                if isinstance(first, torch.nn.Linear) and isinstance(second, torch.nn.BatchNorm1d):
                    first.bias.register_hook(torch.zeros_like)
                    held += 1
    return held


def _comparable(state: dict) -> dict:
    return {k: torch.as_tensor(v).float() for k, v in state.items() if "num_batches_tracked" not in k}


def _max_difference(state: dict, ref: dict) -> float:
    state, ref = _comparable(state), _comparable(ref)
    return max(float((state[k] - ref[k]).abs().max()) for k in ref)


@pytest.mark.parametrize("case", ["global", "global_eager"])
def test_two_ranks_with_global_batch_norm_train_like_one_process(model_runs, case):
    init, ref, ranks = model_runs
    want = _comparable(ref["state"])
    bn_layers = sum(1 for k in want if k.endswith("running_var"))
    assert bn_layers >= 3
    for result in ranks:
        got = result[case]
        assert got["converted"] == bn_layers
        # the pooled kernel runs the MLP blocks' layers; the eager case runs every layer's forward
        fused = len(_model_cfg().easy_hidden_units) + len(_model_cfg().hard_hidden_units)  # the towers' blocks
        assert got["eager_calls"] == (bn_layers if case == "global_eager" else bn_layers - fused) * STEPS
        assert got["pipelined"] == 2  # both EBCs pipelined: the model traced through the new layers
        tracked = {k: int(v) for k, v in got["state"].items() if k.endswith("num_batches_tracked")}
        assert len(tracked) == bn_layers and set(tracked.values()) == {STEPS}  # tracing counted nothing
        state = _comparable(got["state"])
        assert set(state) == set(want)
        for key in want:
            torch.testing.assert_close(state[key], want[key], atol=2e-5, rtol=1e-4, msg=lambda m: f"{key}: {m}")
    # Each rank's loss is its half's mean: their average is the whole batch's loss.
    for step, want in enumerate(ref["losses"]):
        assert sum(r[case]["losses"][step] for r in ranks) / 2 == pytest.approx(want, abs=1e-5)
    # The training moved the weights and statistics being compared.
    assert _max_difference(ref["state"], init) > 1e-2


def test_per_rank_batch_norm_does_not(model_runs):
    """The same run with per-rank statistics ends measurably elsewhere: the comparison above can
    fail."""
    _, ref, ranks = model_runs
    assert all(r["local"]["converted"] == 0 for r in ranks)
    assert _max_difference(ranks[0]["local"]["state"], ref["state"]) > 1e-3
