"""The sharded embedding paths against plain single-process torch.

Data-parallel tables (the CPU route for the paper's Adam): two gloo ranks, each fed one half of
a global batch, take optimizer steps through DistributedModelParallel + build_optimizer; the
result must equal one process training the unsharded model (plain torchrec EBCs on cpu) on the
whole batch with torch.optim.Adam, the penalty's gradient added before a clip over all
parameters (the authors' order):

  * emb_reg_mode=full:    0.1*E added to the gradient of every row of every table (one step,
    forward/backward/step by hand through the DMP);
  * emb_reg_mode=touched: 0.1*E_r added to the gradient of the rows looked up this step only
    (two steps through TrainPipelineSparseDist, as the worker loop trains, with an active clip).

Table-wise sharded tables (fused kernels): the sharded forward equals the unsharded one.

Every distributed case runs in ONE pair of spawned processes (importing torchrec dominates the
cost); the reference numbers are computed in the test process.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed._launch import run_gloo

FIELDS = [("a", 23), ("b", 31), ("c", 17)]  # vocab sizes incl. PAD/OOV
GLOBAL_BATCH = 16  # two ranks x 8 rows
LR, EMB_LR, EMB_REG = 0.01, 0.05, 0.1


def _model_cfg():
    from tf4ctr_dist.config import ModelConfig

    # No BatchNorm (per-rank batch statistics differ from the global batch's), no dropout.
    return ModelConfig(
        embedding_dim=8, ssem="ser", dfm="wsf", easy_hidden_units=[8], hard_hidden_units=[8, 6],
        net_dropout=0.0, batch_norm=False,
    )


def _make_batch(data: dict, lo: int, hi: int):
    """Rows [lo, hi) of the global batch as a Batch (KJT keyed by field, bags of 0..3 ids)."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from tf4ctr_dist.data.batch import Batch

    values, lengths = [], []
    for f, _ in enumerate(FIELDS):
        for bag in data["ids"][f][lo:hi]:
            values.extend(bag)
            lengths.append(len(bag))
    n = hi - lo
    return Batch(
        sparse_features=KeyedJaggedTensor(
            keys=[name for name, _ in FIELDS],
            values=torch.tensor(values, dtype=torch.int64),
            lengths=torch.tensor(lengths, dtype=torch.int32),
        ),
        labels=torch.tensor(data["labels"][lo:hi], dtype=torch.float32),
        group_ids=torch.zeros(n, dtype=torch.int64),
        sample_ids=torch.arange(lo, hi, dtype=torch.int64),
        valid=torch.ones(n, dtype=torch.float32),
    )


def _global_batches(steps: int, seed: int) -> list[dict]:
    """Deterministic global batches; a bag may be empty (a field with no id pools to zero)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        ids = []
        for _, vocab in FIELDS:
            bags = []
            for _ in range(GLOBAL_BATCH):
                k = int(torch.randint(0, 4, (), generator=g))
                bags.append(torch.randint(1, vocab, (k,), generator=g).tolist())  # never PAD (0)
            ids.append(bags)
        labels = torch.randint(0, 2, (GLOBAL_BATCH,), generator=g).float()
        labels[:2] = torch.tensor([0.0, 1.0])  # both classes present
        out.append({"ids": ids, "labels": labels.tolist()})
    return out


def _reference_model():
    """The unsharded model on cpu with fixed weights (tables far from their 1e-4 init)."""
    from tf4ctr_dist.config import LossConfig
    from tf4ctr_dist.model import Objective, TF4CTRTrain, tf4ctr

    torch.manual_seed(1234)
    ref = TF4CTRTrain(tf4ctr(FIELDS, _model_cfg(), device="cpu"), Objective(LossConfig()))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "embedding_bags" in name:
                p.copy_(torch.randn(p.shape) * 0.3)  # row 0 (PAD, never looked up) non-zero too
        ref.model.fusion.w_s.fill_(0.8)
        ref.model.fusion.w_c.fill_(0.3)
    return ref


def _emb_dense(module) -> tuple[list, list]:
    named = list(module.named_parameters())
    return ([p for n, p in named if "embedding_bags" in n], [p for n, p in named if "embedding_bags" not in n])


def _looked_up_rows(data: dict, table: str) -> torch.Tensor:
    """Boolean (vocab,) mask of the rows of `table` (easy_x / hard_x) looked up by the batch."""
    field = table.split("_", 1)[1]
    f = [name for name, _ in FIELDS].index(field)
    mask = torch.zeros(FIELDS[f][1], dtype=torch.bool)
    for bag in data["ids"][f]:
        mask[bag] = True
    return mask


def _reference_train(init: dict, batches: list[dict], mode: str, clip: float) -> dict:
    """Plain torch on the whole global batch, in the authors' order: loss.backward(), add the
    penalty's gradient (full: EMB_REG*E on every row; touched: on the looked-up rows only), clip
    the norm over ALL parameters (tables included), then Adam (dense lr LR, tables EMB_LR).
    Returns the state dict and diagnostics.
    """
    ref = _reference_model()
    ref.load_state_dict(init)
    emb, dense = _emb_dense(ref)
    opt = torch.optim.Adam([{"params": dense, "lr": LR}, {"params": emb, "lr": EMB_LR}], lr=LR)
    norms, losses = [], []
    tables = [n for n, _ in ref.named_parameters() if "embedding_bags" in n]
    for data in batches:
        opt.zero_grad()
        loss, _ = ref(_make_batch(data, 0, GLOBAL_BATCH))
        loss.backward()
        losses.append(float(loss.detach()))
        for name, p in zip(tables, emb):
            looked_up = _looked_up_rows(data, name.split(".")[-2])
            nonzero = p.grad.abs().sum(dim=1) != 0
            # The reference's "touched" (looked up) and the library's (non-zero gradient) agree here.
            assert torch.equal(nonzero, looked_up), name
            with torch.no_grad():
                if mode == "full":
                    p.grad += EMB_REG * p
                else:
                    p.grad[looked_up] += EMB_REG * p[looked_up]
        norms.append(float(torch.nn.utils.clip_grad_norm_(dense + emb, clip)))
        opt.step()
    return {"state": {k: v.detach().clone() for k, v in ref.state_dict().items()}, "norms": norms, "losses": losses}


# ---- the two ranks ---------------------------------------------------------------------------


def _sharded(placement, module):
    from tf4ctr_dist.distributed.sharding import shard_model
    from tf4ctr_dist.model import embedding_tables

    return shard_model(
        module, embedding_tables(FIELDS, _model_cfg()), placement, device=torch.device("cpu"),
        embedding_lr=EMB_LR, embedding_weight_decay=0.0, local_batch_size=GLOBAL_BATCH // 2,
    )


@torch.no_grad()
def _load(dmp, init: dict) -> int:
    """Copy the full reference tensors into the DMP's state (local shards of ShardedTensors);
    returns how many table rows this rank holds."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    rows = 0
    state = dmp.state_dict()
    assert set(state) == set(init), set(state) ^ set(init)
    for key, live in state.items():
        full = torch.as_tensor(init[key])
        if isinstance(live, ShardedTensor):
            for shard in live.local_shards():
                (r0, c0), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                shard.tensor.copy_(full[r0 : r0 + nr, c0 : c0 + nc])
                rows += nr if "embedding_bags" in key else 0
        else:
            live.copy_(full)
            rows += live.shape[0] if "embedding_bags" in key else 0
    return rows


def _state_of(dmp) -> dict:
    """numpy copies of every tensor (data-parallel tables are full replicas on each rank).

    numpy, not tensors: torch.multiprocessing would pass tensors back through shared memory
    that dies with the child process."""
    return {k: v.detach().numpy().copy() for k, v in dmp.state_dict().items()}


def _dp_train(rank: int, world: int, init: dict, batches: list[dict], mode: str, clip: float,
              pipeline: bool = False) -> dict:
    """Train on this rank's halves: by hand (zero_grad / forward / backward / step through the
    DMP) or through TrainPipelineSparseDist, as the worker loop does."""
    from tf4ctr_dist.config import LossConfig
    from tf4ctr_dist.distributed.sharding import build_optimizer, resolve_placement
    from tf4ctr_dist.model import Objective, TF4CTRTrain, tf4ctr

    module = TF4CTRTrain(tf4ctr(FIELDS, _model_cfg(), device="meta"), Objective(LossConfig()))
    dmp, plan = _sharded(resolve_placement("data_parallel", "adam", "cpu"), module)
    optimizer = build_optimizer(dmp, lr=LR, embedding_lr=EMB_LR, emb_reg=EMB_REG, emb_reg_mode=mode,
                                clip_grad_norm=clip)
    _load(dmp, init)
    half = GLOBAL_BATCH // world
    local = [_make_batch(data, rank * half, (rank + 1) * half) for data in batches]
    losses, pipelined = [], 0
    if pipeline:
        from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

        pipe = TrainPipelineSparseDist(dmp, optimizer, torch.device("cpu"), execute_all_batches=True)
        it = iter(local)
        while True:
            try:
                loss, _, _, _ = pipe.progress(it)
            except StopIteration:
                break
            losses.append(float(loss))
        pipelined = len(pipe._pipelined_modules)  # sharded modules whose input dist it took over
    else:
        for batch in local:
            optimizer.zero_grad()
            loss, _ = dmp(batch)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    sharding = {t: ps.sharding_type for m in plan.plan.values() for t, ps in m.items()}
    return {"state": _state_of(dmp), "losses": losses, "sharding": sharding, "pipelined": pipelined}


def _tw_forward(rank: int, world: int, init: dict, data: dict) -> dict:
    from tf4ctr_dist.config import LossConfig
    from tf4ctr_dist.distributed.sharding import resolve_placement
    from tf4ctr_dist.model import Objective, TF4CTRTrain, tf4ctr

    module = TF4CTRTrain(tf4ctr(FIELDS, _model_cfg(), device="meta"), Objective(LossConfig()))
    dmp, plan = _sharded(resolve_placement("table_wise", "rowwise_adagrad", "cpu"), module)
    rows = _load(dmp, init)
    half = GLOBAL_BATCH // world
    with torch.no_grad():
        loss, (_, probs, labels, _) = dmp(_make_batch(data, rank * half, (rank + 1) * half))
    owners = {t: (ps.sharding_type, ps.ranks) for m in plan.plan.values() for t, ps in m.items()}
    return {"probs": probs.numpy().copy(), "loss": float(loss), "labels": labels.numpy().copy(), "rows": rows,
            "owners": owners}


def _all_cases(rank: int, world: int, init: dict, batches: list[dict], clip_touched: float) -> dict:
    from tf4ctr_dist.train.loop import quiet_library_logs

    quiet_library_logs()
    torch.manual_seed(99 + rank)  # the loaded weights, not any rank's init, must decide the result
    return {
        "full": _dp_train(rank, world, init, batches[:1], "full", 10.0),
        "touched": _dp_train(rank, world, init, batches, "touched", clip_touched, pipeline=True),
        "table_wise": _tw_forward(rank, world, init, batches[0]),
    }


# ---- the test process --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs():
    from tf4ctr_dist.train.loop import quiet_library_logs

    quiet_library_logs()
    init = {k: v.detach().clone() for k, v in _reference_model().state_dict().items()}
    batches = _global_batches(2, seed=5)
    # touched: clip at half the first step's dense gradient norm, so clipping is active and,
    # through Adam's second step, changes the result.
    unclipped = _reference_train(init, batches[:1], "full", float("inf"))["norms"][0]
    clip_touched = 0.5 * unclipped
    refs = {
        "full": _reference_train(init, batches[:1], "full", 10.0),
        "touched": _reference_train(init, batches, "touched", clip_touched),
    }
    init_np = {k: v.numpy() for k, v in init.items()}
    ranks = run_gloo(_all_cases, 2, init_np, batches, clip_touched, timeout=240)
    for result in ranks:  # back to tensors
        for case in ("full", "touched"):
            result[case]["state"] = {k: torch.from_numpy(v) for k, v in result[case]["state"].items()}
        for key in ("probs", "labels"):
            result["table_wise"][key] = torch.from_numpy(result["table_wise"][key])
    return {"init": init, "batches": batches, "refs": refs, "ranks": ranks, "clip": clip_touched}


def _assert_state_equal(got: dict, want: dict, atol: float = 1e-5) -> None:
    assert set(got) == set(want)
    for key in sorted(want):
        torch.testing.assert_close(got[key], want[key], atol=atol, rtol=1e-4, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("mode", ["full", "touched"])
def test_data_parallel_adam_step_equals_single_process(runs, mode):
    ref = runs["refs"][mode]
    init = runs["init"]
    for result in runs["ranks"]:
        assert set(result[mode]["sharding"].values()) == {"data_parallel"}
    # Each rank's loss is its half's mean; the two halves average to the global batch's loss.
    for step in range(len(ref["losses"])):
        mean = sum(r[mode]["losses"][step] for r in runs["ranks"]) / 2
        assert mean == pytest.approx(ref["losses"][step], abs=1e-6)
    for result in runs["ranks"]:
        _assert_state_equal(result[mode]["state"], ref["state"])
    if mode == "touched":  # trained through TrainPipelineSparseDist: both EBCs were pipelined
        assert [r[mode]["pipelined"] for r in runs["ranks"]] == [2, 2]
    # The step really moved the tables and a dense weight (a no-op optimizer cannot pass).
    for key in ("model.embedding.embedding_bags.easy_a.weight", "model.complex_encoder.net.0.weight"):
        assert (ref["state"][key] - init[key]).abs().max() > 1e-3, key


def test_full_decay_moves_every_row_touched_only_looked_up_rows(runs):
    """The two modes differ exactly where they should: full mode decays rows no batch looked up,
    touched mode leaves them bit-for-bit unchanged (zero gradient -> zero Adam update)."""
    init, batches = runs["init"], runs["batches"]
    for key in init:
        if "embedding_bags" not in key:
            continue
        table = key.split(".")[-2]
        seen = _looked_up_rows(batches[0], table) | _looked_up_rows(batches[1], table)
        assert (~seen).sum() >= 3, f"{table}: test needs rows nobody looks up"
        for result in runs["ranks"]:
            full, touched = result["full"]["state"][key], result["touched"]["state"][key]
            assert torch.equal(touched[~seen], init[key][~seen]), table
            # The penalty alone drives a never-seen row: Adam's first step moves it by ~lr against its sign.
            moved = full[~seen] - init[key][~seen]
            assert torch.allclose(moved, -EMB_LR * torch.sign(init[key][~seen]), atol=1e-4), table
            assert (touched[seen] - init[key][seen]).abs().min() > 0, table


def test_touched_run_clipped_the_gradients(runs):
    """The clip value of the touched run is active, so its equality with the reference covers
    clipping over dense parameters and tables together (a dense-only clip would differ)."""
    ref = runs["refs"]["touched"]
    assert ref["norms"][0] > runs["clip"] * 1.5


def test_table_wise_sharded_forward_equals_unsharded(runs):
    init, data = runs["init"], runs["batches"][0]
    ref = _reference_model()
    ref.load_state_dict(init)
    with torch.no_grad():
        loss, (_, probs, labels, _) = ref(_make_batch(data, 0, GLOBAL_BATCH))
    half = GLOBAL_BATCH // 2
    owners = runs["ranks"][0]["table_wise"]["owners"]
    assert {kind for kind, _ in owners.values()} == {"table_wise"}
    # Tables live on both ranks, so the all-to-all of lookups and pooled embeddings is exercised.
    assert {tuple(ranks) for _, ranks in owners.values()} == {(0,), (1,)}
    rows = [r["table_wise"]["rows"] for r in runs["ranks"]]
    assert sum(rows) == 2 * sum(v for _, v in FIELDS) and min(rows) > 0
    for rank, result in enumerate(runs["ranks"]):
        got = result["table_wise"]
        assert torch.equal(got["labels"], labels[rank * half : (rank + 1) * half])
        torch.testing.assert_close(got["probs"], probs[rank * half : (rank + 1) * half], atol=1e-6, rtol=0)
    assert sum(r["table_wise"]["loss"] for r in runs["ranks"]) / 2 == pytest.approx(float(loss), abs=1e-6)
    # Sanity: the predictions depend on the loaded tables (not all equal / not the 1e-4 init).
    assert float(probs.max() - probs.min()) > 0.05
