"""The pure pieces of the step-level cross-check against the authors' code
(benchmarks/authors_check.py): the parameter mapping, the float64 lookup and the comparison.
Their code is not needed here; the check itself runs by hand (README "Results")."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks import authors_check

FIELDS = [("user", 50), ("item", 70), ("daytime", 9)]


@pytest.fixture(scope="module")
def model():
    _, module = authors_check.build_model(FIELDS, seed=3, path="eager")
    return module.model


def test_every_parameter_and_buffer_maps_to_one_of_theirs(model):
    state = model.state_dict()
    theirs = authors_check.to_theirs(state)
    # WSF's two scalars become their one (2, 1) weight; everything else maps one to one
    assert len(theirs) == len(state) - 1
    assert theirs["DFM.w"].shape == (2, 1)
    assert theirs["DFM.w"][:, 0].tolist() == [state["fusion.w_s"].item(), state["fusion.w_c"].item()]
    for key, value in state.items():
        if not key.startswith("fusion."):
            np.testing.assert_array_equal(theirs[authors_check.their_name(key)], value.double().numpy())
    # both twin table sets and both encoders, field by field
    for f, _ in FIELDS:
        assert f"SSM.easy_sample_embedding.embedding_layer.embedding_layers.{f}.weight" in theirs
        assert f"SSM.hard_sample_embedding.embedding_layer.embedding_layers.{f}.weight" in theirs
    assert any(k.startswith("easy_encoder.mlp.") for k in theirs)
    assert any(k.startswith("hard_encoder.mlp.") for k in theirs)
    with pytest.raises(KeyError):
        authors_check.their_name("something.else")


def test_float64_lookup_is_the_table_rows(model):
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    names = [f for f, _ in FIELDS]
    ebc = model.embedding
    ids = torch.tensor([[1, 2, 3], [49, 69, 8], [0, 0, 0], [7, 5, 1]])  # (B, F)
    features = KeyedJaggedTensor.from_lengths_sync(keys=names, values=ids.T.reshape(-1),
                                                   lengths=torch.ones(ids.numel(), dtype=torch.int32))
    expected = ebc(features).values()
    exact = authors_check.exact_lookup(ebc, names)(features)
    assert exact.keys() == names
    torch.testing.assert_close(exact.values(), expected)
    tables = list(ebc.embedding_bags.values())
    torch.testing.assert_close(exact.values()[1], torch.cat([tables[j].weight[ids[1, j]] for j in range(3)]))


def _theirs(model) -> dict:
    out = {"loss": np.array([0.5, 0.4, 0.3]), "valid_probs": np.array([0.1, 0.7, 0.9])}
    out.update({f"p:{k}": v for k, v in authors_check.to_theirs(model.state_dict()).items()})
    return out


def test_compare_sees_a_moved_parameter_and_keeps_pre_batchnorm_biases_apart(model):
    theirs = _theirs(model)
    same = authors_check.compare(theirs, {k: v.copy() for k, v in theirs.items()})
    assert same["loss_rel_max"] == same["valid_probs_mean_abs"] == same["param_rel_max"] == same["pre_bn_rel_max"] == 0

    ours = {k: v.copy() for k, v in theirs.items()}
    key = "p:hard_encoder.mlp.0.weight"
    ours[key][0, 0] += 1e-3 * np.abs(ours[key]).max()
    ours["loss"][2] *= 1 + 1e-6
    ours["valid_probs"][1] += 3e-4
    moved = authors_check.compare(theirs, ours)
    assert moved["param_worst"] == key[2:]
    assert moved["param_rel_max"] == pytest.approx(1e-3)
    assert moved["loss_rel_max"] == pytest.approx(1e-6) and moved["loss_rel_first"] == 0
    assert moved["valid_probs_mean_abs"] == pytest.approx(1e-4)

    # a Linear bias feeding a BatchNorm (and that BatchNorm's running mean) is reported apart
    bias = next(k for k in theirs if k.startswith("p:hard_encoder.mlp.") and k.endswith(".bias")
                and f"{k.rsplit('.', 2)[0]}.{int(k.rsplit('.', 2)[1]) + 1}.running_mean" in theirs)
    ours = {k: v.copy() for k, v in theirs.items()}
    ours[bias] = ours[bias] + 1.0
    apart = authors_check.compare(theirs, ours)
    assert apart["param_rel_max"] == 0 and apart["pre_bn_rel_max"] > 0


def test_seeded_dropout_masks_follow_the_layer_name_and_the_call():
    from benchmarks.authors_side import use_seeded_dropout

    _, ours = authors_check.build_model(FIELDS, seed=3, path="eager", dropout=0.25)
    twin = torch.nn.ModuleDict({"easy_encoder": torch.nn.ModuleDict({"mlp": torch.nn.Sequential(
        torch.nn.Identity(), torch.nn.Identity(), torch.nn.Identity(), torch.nn.Dropout(0.25))})})
    assert use_seeded_dropout(ours.model, authors_check.their_name) == 5  # after each of 2 + 3 hidden layers
    assert use_seeded_dropout(twin) == 1
    mine, theirs = ours.model.simple_encoder.net[3], twin.easy_encoder.mlp[3]  # both 'easy_encoder.mlp.3'
    x = torch.rand(64, 400, dtype=torch.float64) + 0.5
    first, second = mine(x), mine(x)
    torch.testing.assert_close(theirs(x), first, rtol=0, atol=0)  # same name, same call: same mask
    torch.testing.assert_close(theirs(x), second, rtol=0, atol=0)
    assert not torch.equal(first, second)  # the next call draws another mask
    kept = first != 0
    assert abs(kept.double().mean().item() - 0.75) < 0.01
    torch.testing.assert_close(first[kept], x[kept] / 0.75)
    other = ours.model.simple_encoder.net[7](x)  # the second easy layer: another mask on its first call
    assert not torch.equal(other != 0, kept)
    mine.eval()
    assert mine(x) is x
