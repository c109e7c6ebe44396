"""The sweep file: expansion into cells x seeds, checks on the driver, the baseline cell, concurrency."""

from __future__ import annotations

import pytest

from tf4ctr_dist.config import ConfigError, RunConfig
from tf4ctr_dist.studies.sweep import (baseline_label, build_trials, expand_cells, max_concurrent,
                                       spec_from_dict)


def test_grid_times_random_times_seeds():
    spec = spec_from_dict({"grid": {"ssem": ["share", "ser"], "dfm": ["sum", "wsf"]},
                           "random": {"alpha": {"uniform": [0.1, 0.5]}}, "samples": 2, "seeds": [1, 2, 3]})
    cells = expand_cells(spec)
    assert len(cells) == 8
    assert [c.values["ssem"] for c in cells[:4]] == ["share", "share", "ser", "ser"]
    alphas = [c.values["alpha"] for c in cells]
    assert all(0.1 <= a <= 0.5 for a in alphas) and len(set(alphas)) == 8
    assert expand_cells(spec)[3].values == cells[3].values  # the draws are reproducible
    trials = build_trials(spec, RunConfig(), "/sweep", ["data.url=/d"])
    assert len(trials) == 24
    t = trials[4]
    assert t.config.model.ssem == t.cell.values["ssem"] and t.config.loss.alpha == t.cell.values["alpha"]
    assert t.config.train.seed == 2 and t.config.out == f"/sweep/runs/{t.cell.slug}/seed-2"


def test_mistakes_are_refused_with_the_key():
    with pytest.raises(ConfigError, match="did you mean 'dfm'"):
        spec_from_dict({"grid": {"dfn": ["sum"]}}, where="s.yaml")
    with pytest.raises(ConfigError, match="unknown sweep key"):
        spec_from_dict({"grids": {"dfm": ["sum"]}})
    with pytest.raises(ConfigError, match="seeds"):
        spec_from_dict({"grid": {"seed": [1, 2]}})
    with pytest.raises(ConfigError, match="uniform"):
        spec_from_dict({"random": {"alpha": {"gauss": [0, 1]}}})
    # A value of the wrong kind fails on its cell, before Ray starts.
    spec = spec_from_dict({"grid": {"ssem": ["share", "serr"]}})
    with pytest.raises(ConfigError, match="ssem=serr"):
        build_trials(spec, RunConfig(), "/sweep", ["data.url=/d"])


def test_baseline_and_concurrency():
    spec = spec_from_dict({"grid": {"ssem": ["share", "ser"], "dfm": ["sum", "wsf"]},
                           "baseline": {"ssem": "share", "dfm": "sum"}})
    assert baseline_label(spec, expand_cells(spec)) == "ssem=share dfm=sum"
    spec.baseline = {"ssem": "share"}
    with pytest.raises(ConfigError, match="matches 2 cells"):
        baseline_label(spec, expand_cells(spec))
    cfg = RunConfig().with_overrides(["workers=2", "cpus_per_worker=1"])
    assert max_concurrent(16, cfg) == 5 and max_concurrent(2, cfg) == 1
