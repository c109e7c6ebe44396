"""Objective and TF4CTRTrain: the loss the pipeline back-propagates, the tuple the loop reads,
and FX traceability (TorchRec's train pipeline traces the wrapper to find the sharded EBCs)."""

from __future__ import annotations

import math

import pytest
import torch
import torchrec
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tf4ctr_dist.config import LossConfig, ModelConfig
from tf4ctr_dist.data.batch import Batch
from tf4ctr_dist.losses import bce_loss, focal_loss
from tf4ctr_dist.model import Objective, TF4CTRTrain, tf4ctr

FIELDS = [("a", 11), ("b", 7), ("c", 13)]


def _logits():
    z = torch.tensor([[1.2], [-0.7], [0.1], [2.5], [-3.0]], dtype=torch.float64)
    z_s = torch.tensor([[0.4], [-1.5], [0.9], [1.1], [0.3]], dtype=torch.float64)
    z_c = torch.tensor([[-0.2], [0.6], [-1.0], [2.0], [-0.5]], dtype=torch.float64)
    labels = torch.tensor([[1.0], [0.0], [0.0], [1.0], [1.0]], dtype=torch.float64)
    return z, z_s, z_c, labels


def _by_hand(z, z_s, z_c, y, cfg: LossConfig) -> float:
    """Plain-python BCE(z) + L_TF(z_s, z_c) over all samples."""
    sig = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731
    m = 2.0 - cfg.c if cfg.m is None else cfg.m
    bce, simple, complex_ = [], [], []
    for zi, si, ci, yi in zip(z.view(-1).tolist(), z_s.view(-1).tolist(), z_c.view(-1).tolist(), y.view(-1).tolist()):
        ce = lambda p: -(yi * math.log(p) + (1 - yi) * math.log(1 - p))  # noqa: E731
        pt = lambda p: yi * p + (1 - yi) * (1 - p)  # noqa: E731
        p, ps, pc = sig(zi), sig(si), sig(ci)
        bce.append(ce(p))
        simple.append(ce(ps) * (cfg.c + pt(ps)) ** cfg.gamma)
        complex_.append(ce(pc) * (m - pt(pc)) ** cfg.gamma)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    if cfg.loss == "bce":
        return mean(bce)
    return mean(bce) + cfg.alpha * mean(simple) + (1 - cfg.alpha) * mean(complex_)


@pytest.mark.parametrize(
    "cfg",
    [LossConfig(), LossConfig(alpha=0.35, c=0.9, gamma=2.0), LossConfig(c=0.5, m=1.2, gamma=1.5),
     LossConfig(loss="bce")],
    ids=["tf-default", "tf-criteo", "tf-m", "bce"],
)
def test_objective_matches_hand_computed_loss(cfg: LossConfig) -> None:
    z, z_s, z_c, y = _logits()
    valid = torch.ones_like(y)
    got = Objective(cfg)(z, z_s, z_c, y, valid)
    assert float(got) == pytest.approx(_by_hand(z, z_s, z_c, y, cfg), rel=1e-12)
    if cfg.loss == "bce":
        assert float(got) == pytest.approx(float(bce_loss(z, y, valid)), rel=1e-12)
    else:
        assert float(got) > float(bce_loss(z, y, valid)) + 0.1  # the auxiliary term is there


def test_bce_objective_ignores_the_twin_logits() -> None:
    z, z_s, z_c, y = _logits()
    valid = torch.ones_like(y)
    z_s.requires_grad_(True)
    z_c.requires_grad_(True)
    Objective(LossConfig())(z, z_s, z_c, y, valid).backward()
    assert z_s.grad.abs().sum() > 0 and z_c.grad.abs().sum() > 0  # tf trains the twin heads ...
    bce = Objective(LossConfig(loss="bce"))(z, z_s, z_c, y, valid)
    assert not bce.requires_grad  # ... bce does not touch them (z itself needs no grad here)


@pytest.mark.parametrize("loss", ["tf", "bce", "focal", "rce", "tce"])
def test_padding_rows_do_not_change_the_loss(loss: str) -> None:
    z, z_s, z_c, y = _logits()
    # Training mode, one step each: T-CE then drops the floor(0.2 * 5) = 1 worst valid sample.
    cfg = LossConfig(loss=loss, tce_num_gradual=1, tce_max_drop_rate=0.2)
    real = Objective(cfg)(z, z_s, z_c, y, torch.ones_like(y))
    objective = Objective(cfg)
    pad = lambda t, v: torch.cat([t, torch.full((3, 1), v, dtype=t.dtype)])  # noqa: E731
    # Padding carries extreme logits (and label 1) that would dominate any unmasked mean.
    padded = objective(pad(z, -50.0), pad(z_s, -50.0), pad(z_c, 50.0), pad(y, 1.0),
                       torch.cat([torch.ones_like(y), torch.zeros(3, 1, dtype=y.dtype)]))
    assert float(padded) == pytest.approx(float(real), rel=1e-12)


def test_focal_objective_is_focal_loss_on_the_fused_logit() -> None:
    z, z_s, z_c, y = _logits()
    valid = torch.ones_like(y)
    got = Objective(LossConfig(loss="focal", focal_gamma=2.0))(z, z_s, z_c, y, valid)
    assert float(got) == pytest.approx(float(focal_loss(z, y, valid, gamma=2.0)), rel=1e-12)
    assert float(got) < float(bce_loss(z, y, valid))


def test_tce_objective_counts_training_steps_only() -> None:
    z, z_s, z_c, y = _logits()
    valid = torch.ones_like(y)
    objective = Objective(LossConfig(loss="tce", tce_max_drop_rate=0.4, tce_num_gradual=2))
    objective.train()
    first = objective(z, z_s, z_c, y, valid)  # step 1: rate 0.2 -> drop 1 of 5
    second = objective(z, z_s, z_c, y, valid)  # step 2: rate 0.4 -> drop 2 of 5
    assert objective.steps == 2
    objective.eval()
    objective(z, z_s, z_c, y, valid)
    assert objective.steps == 2
    per = torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="none").view(-1).sort().values
    assert float(first) == pytest.approx(float(per[:4].mean()), rel=1e-12)
    assert float(second) == pytest.approx(float(per[:3].mean()), rel=1e-12)


# ---- TF4CTRTrain ------------------------------------------------------------------------------


def _batch(valid=(1, 1, 1, 1, 0)) -> Batch:
    # 5 samples; field "c" has an empty bag for sample 2 and two ids for sample 3.
    return Batch(
        sparse_features=KeyedJaggedTensor(
            keys=["a", "b", "c"],
            values=torch.tensor([1, 4, 9, 2, 10, 3, 6, 1, 2, 5, 12, 3, 3, 7, 8]),
            lengths=torch.tensor([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 2, 1], dtype=torch.int32),
        ),
        labels=torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0]),
        group_ids=torch.zeros(5, dtype=torch.int64),
        sample_ids=torch.arange(5),
        valid=torch.tensor(valid, dtype=torch.float32),
    )


def _wrapper(loss: str = "tf", **model) -> TF4CTRTrain:
    torch.manual_seed(0)
    cfg = ModelConfig(embedding_dim=4, easy_hidden_units=[6], hard_hidden_units=[6, 5], net_dropout=0.0, **model)
    wrapper = TF4CTRTrain(tf4ctr(FIELDS, cfg, device="cpu"), Objective(LossConfig(loss=loss)))
    with torch.no_grad():  # tables far from their 1e-4 init, so the output depends on them
        for name, p in wrapper.named_parameters():
            if "embedding_bags" in name:
                p.copy_(torch.randn(p.shape))
    return wrapper


def test_forward_returns_loss_and_the_loop_tuple() -> None:
    wrapper = _wrapper().eval()
    batch = _batch()
    loss, (loss_out, probs, labels, valid) = wrapper(batch)
    z, z_s, z_c = wrapper.model(batch.sparse_features)
    assert loss.requires_grad and loss.dim() == 0
    assert not loss_out.requires_grad and torch.equal(loss_out, loss.detach())
    want = wrapper.objective(z, z_s, z_c, batch.labels.view(-1, 1), batch.valid.view(-1, 1))
    assert float(loss) == pytest.approx(float(want), rel=1e-6)
    assert probs.shape == (5,) and not probs.requires_grad
    torch.testing.assert_close(probs, torch.sigmoid(z).view(-1).detach())
    assert float(probs.max() - probs.min()) > 1e-3
    assert labels is batch.labels and valid is batch.valid
    # The padding row (valid 0) does not enter the loss: same loss without it.
    four = Batch(
        sparse_features=KeyedJaggedTensor(
            keys=["a", "b", "c"], values=torch.tensor([1, 4, 9, 2, 3, 6, 1, 2, 12, 3, 3, 7]),
            lengths=torch.tensor([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 2], dtype=torch.int32),
        ),
        labels=batch.labels[:4], group_ids=batch.group_ids[:4], sample_ids=batch.sample_ids[:4],
        valid=torch.ones(4),
    )
    loss4, (_, probs4, _, _) = wrapper(four)
    assert float(loss4) == pytest.approx(float(loss), rel=1e-6)
    torch.testing.assert_close(probs4, probs[:4])


def test_backward_reaches_tables_and_dense_parts() -> None:
    wrapper = _wrapper(batch_norm=False).train()
    loss, _ = wrapper(_batch())
    loss.backward()
    grads = {n: p.grad for n, p in wrapper.named_parameters()}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    easy_a = grads["model.embedding.embedding_bags.easy_a.weight"]
    # Rows looked up by valid samples get gradient; row 0 (PAD) and unseen rows do not.
    assert easy_a[[1, 4, 9, 2]].abs().sum(dim=1).min() > 0
    assert easy_a[[0, 3, 5]].abs().sum() == 0
    # Sample 4 is padding: its row of field a (id 10) gets no gradient ...
    assert easy_a[10].abs().sum() == 0
    # ... unless BatchNorm mixes it into the batch statistics: why training batches carry no
    # padding rows (ParquetSplitReader pad_tail=False).
    with_bn = _wrapper(batch_norm=True).train()
    with_bn(_batch())[0].backward()
    assert dict(with_bn.named_parameters())["model.embedding.embedding_bags.easy_a.weight"].grad[10].abs().sum() > 0


def _trace_roundtrip(gm: torch.nn.Module, wrapper: TF4CTRTrain) -> None:
    batch = _batch()
    loss, (_, probs, labels, valid) = wrapper(batch)
    t_loss, (_, t_probs, t_labels, t_valid) = gm(batch)
    torch.testing.assert_close(t_loss, loss)
    torch.testing.assert_close(t_probs, probs)
    assert torch.equal(t_labels, labels) and torch.equal(t_valid, valid)


@pytest.mark.parametrize("ssem, dfm", [("ser", "wsf"), ("share", "sum"), ("gm", "cf"), ("moe", "moef")])
def test_torchrec_symbolic_trace(ssem: str, dfm: str) -> None:
    wrapper = _wrapper(ssem=ssem, dfm=dfm).eval()
    gm = torchrec.fx.symbolic_trace(wrapper)
    _trace_roundtrip(gm, wrapper)


def test_pipeline_tracer_sees_the_ebcs_called_on_the_batch_features() -> None:
    """TrainPipelineSparseDist traces the (DMP-wrapped) module with its Tracer, sharded modules
    as leaves, and pipelines a sharded module only when its input comes straight from the batch
    (getattr on the placeholder). Here the EBCs stand in for their sharded versions."""
    from torchrec.distributed.train_pipeline.tracing import Tracer

    wrapper = _wrapper().eval()
    leaves = ["model.embedding", "model.hard_embedding"]
    graph = Tracer(leaf_modules=leaves).trace(wrapper)
    calls = {n.target: n for n in graph.nodes if n.op == "call_module" and n.target in leaves}
    assert set(calls) == set(leaves)
    (placeholder,) = [n for n in graph.nodes if n.op == "placeholder"]
    for node in calls.values():
        (arg,) = node.args
        assert arg.op == "call_function" and arg.args == (placeholder, "sparse_features"), arg.format_node()
    _trace_roundtrip(torch.fx.GraphModule(wrapper, graph), wrapper)
