"""Per-epoch analyses: gradient norms, fusion values and histograms against hand computation
on a tiny real TF4CTR (the difficulty buckets: tests/unit/test_metrics.py and the 2-rank run in
tests/distributed/test_run_analyses.py)."""

from __future__ import annotations

import math

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tf4ctr_dist.config import LossConfig, ModelConfig
from tf4ctr_dist.data.batch import Batch
from tf4ctr_dist.metrics import difficulty_buckets
from tf4ctr_dist.model import Objective, TF4CTRTrain, tf4ctr
from tf4ctr_dist.studies.analyses import DifficultyTelemetry, FusionProbe, GradNormProbe, Histogram, Probes

FIELDS = [("a", 11), ("b", 7), ("c", 13)]


def _batch(valid=(1, 1, 1, 1, 0)) -> Batch:
    return Batch(
        sparse_features=KeyedJaggedTensor(
            keys=["a", "b", "c"],
            values=torch.tensor([1, 4, 9, 2, 10, 3, 6, 1, 2, 5, 12, 3, 3, 7, 8]),
            lengths=torch.tensor([1] * 12 + [0, 2, 1], dtype=torch.int32),
        ),
        labels=torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0]),
        group_ids=torch.zeros(5, dtype=torch.int64),
        sample_ids=torch.arange(5),
        valid=torch.tensor(valid, dtype=torch.float32),
    )


def _wrapper(loss: str, **model) -> TF4CTRTrain:
    torch.manual_seed(0)
    cfg = ModelConfig(embedding_dim=4, easy_hidden_units=[6], hard_hidden_units=[6, 5], net_dropout=0.0, **model)
    wrapper = TF4CTRTrain(tf4ctr(FIELDS, cfg, device="cpu"), Objective(LossConfig(loss=loss, alpha=0.3, c=0.6, gamma=2.0)))
    with torch.no_grad():
        for p in wrapper.parameters():
            if p.dim() == 2 and p.shape[1] in (2, 4):  # the tables
                p.normal_(0, 0.5)
    return wrapper


def test_grad_norms_bce_wsf_by_hand():
    """loss=bce, dfm=wsf: L = sum_valid BCE(w_s z_s + w_c z_c) / n_valid, so
    dL/dz_s,i = w_s (sigmoid(z_i) - y_i) valid_i / n_valid, and the same with w_c."""
    wrapper = _wrapper("bce", dfm="wsf")
    with torch.no_grad():
        wrapper.model.fusion.w_s.fill_(0.8)
        wrapper.model.fusion.w_c.fill_(-1.7)
    probe = GradNormProbe(wrapper.model)
    probe.enabled = True
    batch = _batch()
    loss, (_, p, y, valid) = wrapper(batch)
    loss.backward()
    r = (p.double() - y.double()) * valid.double() / valid.sum()
    norms = probe.take()
    assert norms["simple"] == [pytest.approx(0.8 * float(r.norm()), rel=1e-5)]
    assert norms["complex"] == [pytest.approx(1.7 * float(r.norm()), rel=1e-5)]
    assert probe.take() == {"simple": [], "complex": []}
    probe.enabled = False
    wrapper(batch)[0].backward()
    assert probe.take() == {"simple": [], "complex": []}


def test_grad_norms_twin_focus_equal_autograd():
    """loss=tf: the probe's norms are the norms of autograd's dL/dz_s, dL/dz_c, one per step."""
    wrapper = _wrapper("tf", dfm="sum")
    probe = GradNormProbe(wrapper.model)
    probe.enabled = True
    batch = _batch()
    captured = {}
    hooks = [wrapper.model.simple_head.register_forward_hook(lambda m, i, o: captured.__setitem__("s", o)),
             wrapper.model.complex_head.register_forward_hook(lambda m, i, o: captured.__setitem__("c", o))]
    for _ in range(2):
        loss = wrapper(batch)[0]
        g_s, g_c = torch.autograd.grad(loss, [captured["s"], captured["c"]], retain_graph=True)
        loss.backward()
        expected = (float(g_s.norm()), float(g_c.norm()))
    for h in hooks:
        h.remove()
    norms = probe.take()
    assert len(norms["simple"]) == 4  # autograd.grad also runs the tensor hooks: two per step
    assert norms["simple"][-1] == pytest.approx(expected[0], rel=1e-6)
    assert norms["complex"][-1] == pytest.approx(expected[1], rel=1e-6)
    assert expected[0] > 0 and expected[1] > 0 and expected[0] != pytest.approx(expected[1])


@pytest.mark.parametrize("ssem, dfm, names", [("gm", "wsf", ["ssem_gate", "wsf"]),
                                               ("moe", "moef", ["ssem_gate_easy", "ssem_gate_hard", "moef_gate"]),
                                               ("share", "vf", ["vf_mix"])])
def test_fusion_values_by_hand(ssem, dfm, names):
    wrapper = _wrapper("tf", ssem=ssem, dfm=dfm)
    wrapper.eval()
    probe = FusionProbe(wrapper.model)
    probe.active = True
    batch = _batch(valid=(1, 1, 1, 0, 0))
    model = wrapper.model
    with torch.no_grad():
        wrapper(batch)
        probe.keep(batch.valid > 0)
        got = probe.result()
        probe.active = False
        assert sorted(got) == sorted(names)
        # By hand: the gate / mixing weights of the 3 real samples.
        h = torch.cat([model.embedding(batch.sparse_features)[k] for k in ["a", "b", "c"]], dim=1)
        if ssem == "gm":
            want = {"ssem_gate": torch.sigmoid(model.ssem.gate(h))[:3]}
        elif ssem == "moe":
            want = {"ssem_gate_easy": torch.softmax(model.ssem.gate_es(h), -1)[:3],
                    "ssem_gate_hard": torch.softmax(model.ssem.gate_hs(h), -1)[:3]}
        else:
            want = {}
        if dfm == "moef":
            h_es, h_hs = model.ssem(h)
            v = torch.cat([model.simple_encoder(h_es), model.complex_encoder(h_hs)], dim=1)
            want["moef_gate"] = torch.softmax(model.fusion.gate(v), -1)[:3]
        if dfm == "vf":
            v_s, v_c = model.simple_encoder(h), model.complex_encoder(h)
            pi = torch.cat([model.fusion.score_s(v_s), model.fusion.score_c(v_c)], dim=1)
            want["vf_mix"] = torch.softmax(pi / model.fusion.tau, -1)[:3]
    for name, w in want.items():
        assert got[name]["mean"] == pytest.approx(w.mean(0).tolist(), rel=1e-5)
        assert got[name]["std"] == pytest.approx(w.std(0, unbiased=False).tolist(), rel=1e-4, abs=1e-7)
    if dfm == "wsf":
        assert got["wsf"] == {"w_s": 0.5, "w_c": 0.5}
    with torch.no_grad():
        wrapper(_batch())
    assert probe._batch == {}  # inactive: nothing recorded


def test_histogram_and_buckets_by_hand():
    p = torch.tensor([0.01, 0.049, 0.05, 0.5, 0.97, 1.0, 0.2, 0.8])
    y = torch.tensor([0, 0, 1, 1, 1, 0, 0, 1.0])
    valid = torch.tensor([1, 1, 1, 1, 1, 1, 1, 0.0])
    h = Histogram(bins=20)
    h.add(p, y, valid)
    r = h.result()
    neg, pos = r["negative"], r["positive"]
    assert sum(neg) == 4 and sum(pos) == 3
    assert neg[0] == 2 and neg[19] == 1 and neg[4] == 1  # 0.01, 0.049 | 1.0 (last bin closed) | 0.2
    assert pos[1] == 1 and pos[10] == 1 and pos[19] == 1  # 0.05 | 0.5 | 0.97
    assert len(r["edges"]) == 21 and r["edges"][1] == 0.05
    # Difficulty buckets (gap |y - p|: < 0.3 well, < 0.6 poorly, else misclassified).
    b = difficulty_buckets(y[:7].numpy(), p[:7].numpy())
    assert (b["positive"]["well"], b["positive"]["poorly"], b["positive"]["misclassified"]) == (1, 1, 1)
    assert (b["negative"]["well"], b["negative"]["poorly"], b["negative"]["misclassified"]) == (3, 0, 1)
    assert b["negative"]["well_frac"] == pytest.approx(0.75)


def test_probes_follow_the_setting():
    wrapper = _wrapper("tf")
    probes = Probes(wrapper, ["buckets"])
    assert probes.grad_norms is None and probes.fusion is None and probes.wants("buckets")
    probes = Probes(wrapper, ["grad_norms", "fusion"])
    assert probes.grad_norms is not None and probes.fusion is not None and not probes.wants("histograms")
    assert probes.telemetry is None
    assert Probes(wrapper, ["telemetry"]).telemetry is not None
    assert Probes(_wrapper("bce"), ["telemetry"]).telemetry is None  # no twin terms to watch
    assert not math.isnan(0.0)


def test_board_on_object_storage_uploads_on_flush():
    """A run folder behind an fsspec URL (memory:// standing in for s3://) gets the event files
    copied up at each flush and the local temporary folder removed at close."""
    pytest.importorskip("tensorboard")
    import os

    import fsspec
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tf4ctr_dist.studies.tensorboard import RunBoard

    board = RunBoard("memory://bucket/run", enabled=True)
    board.scalar("valid/AUC", 0.75, 1)
    board.histogram("predictions_valid/positive", [0.0, 0.5, 1.0], [3, 5], 1)
    board.flush()
    fs = fsspec.filesystem("memory")
    files = fs.find("/bucket/run/tb")
    # The upload holds the events written before the flush (tensorboardX queues them).
    assert len(files) == 1 and fs.size(files[0]) > 0
    board.scalar("valid/AUC", 0.8, 2)  # after an upload: a new event file in the same folder
    local = board.local
    board.close()
    assert not os.path.exists(local)
    files = fs.find("/bucket/run/tb")
    assert len(files) == 2
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        for name in files:
            with open(os.path.join(d, os.path.basename(name)), "wb") as f:
                f.write(fs.cat_file(name))
        acc = EventAccumulator(d)
        acc.Reload()
        assert [(e.step, e.value) for e in acc.Scalars("valid/AUC")] == [(1, 0.75), (2, pytest.approx(0.8))]
        assert list(acc.Histograms("predictions_valid/positive")[0].histogram_value.bucket) == [3, 5]
    assert RunBoard("memory://x", enabled=False).writer is None


def test_progress_eta_format():
    from tf4ctr_dist.progress import duration

    assert [duration(s) for s in (4.4, 75, 3725)] == ["4s", "1m15s", "1h02m"]


def test_telemetry_windows_by_hand():
    """Per window: the share of real samples with p_t >= 0.5 (fused, simple, complex) and the mean
    TF weights (c + p_t,s)^gamma and (m - p_t,c)^gamma, m = 2 - c; padding and eval passes ignored."""
    wrapper = _wrapper("tf")
    probes = Probes(wrapper, ["telemetry"])
    tele = probes.telemetry
    assert (tele.c, tele.m, tele.gamma) == (0.6, 1.4, 2.0)
    seen = {}
    wrapper.model.register_forward_hook(lambda m, i, out: seen.update(z=[t.detach() for t in out]))
    batch = _batch()
    wrapper.train()
    assert tele.window_result(1) is None  # not enabled yet: nothing observed
    tele.enabled = True
    wrapper(batch)
    z, z_s, z_c = (t.reshape(-1).double() for t in seen["z"])
    wrapper(_batch(valid=(1, 0, 0, 0, 0)))
    z2 = [t.reshape(-1).double() for t in seen["z"]]
    wrapper.eval()
    wrapper(batch)  # evaluation: not counted
    first = tele.window_result(2)
    wrapper.train()
    wrapper(batch)
    second = tele.window_result(3)

    y = batch.labels.double()

    def p_t(logit):
        p = torch.sigmoid(logit)
        return y * p + (1 - y) * (1 - p)

    keep = batch.valid.double()
    keep2 = torch.tensor([1.0, 0, 0, 0, 0], dtype=torch.float64)
    n = keep.sum() + keep2.sum()

    def share(a, b):
        return float((((p_t(a) >= 0.5) * keep).sum() + ((p_t(b) >= 0.5) * keep2).sum()) / n)

    assert first["step"] == 2 and first["samples"] == 5
    assert first["easy_share_fused"] == pytest.approx(share(z, z2[0]))
    assert first["easy_share_simple"] == pytest.approx(share(z_s, z2[1]))
    assert first["easy_share_complex"] == pytest.approx(share(z_c, z2[2]))
    w_s = (((0.6 + p_t(z_s)) ** 2 * keep).sum() + ((0.6 + p_t(z2[1])) ** 2 * keep2).sum()) / n
    w_c = (((1.4 - p_t(z_c)) ** 2 * keep).sum() + ((1.4 - p_t(z2[2])) ** 2 * keep2).sum()) / n
    assert first["mean_weight_simple"] == pytest.approx(float(w_s), rel=1e-6)
    assert first["mean_weight_complex"] == pytest.approx(float(w_c), rel=1e-6)
    assert second["samples"] == 4  # the third window: one batch of 4 real samples
    epoch = tele.epoch_result()  # single process: the same windows
    assert [w["step"] for w in epoch] == [2, 3] and epoch[0] == pytest.approx(first)
    assert tele.epoch_result() == []  # a new epoch starts empty
