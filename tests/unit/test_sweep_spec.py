"""The sweep file: expansion into cells x seeds, checks on the driver, the baseline cell, concurrency."""

from __future__ import annotations

import pytest

from tf4ctr_dist.config import ConfigError, RunConfig
from tf4ctr_dist.studies.sweep import (baseline_label, build_trials, cluster_config, expand_cells,
                                       max_concurrent, spec_from_dict)


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



def test_the_cluster_is_sized_for_the_largest_trial(monkeypatch):
    monkeypatch.delenv("MKL_CBWR", raising=False)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    spec = spec_from_dict({"grid": {"cluster.workers": [1, 3], "cluster.cpus_per_worker": [2, 1]}, "seeds": [1]})
    trials = build_trials(spec, RunConfig(), "/sweep", ["data.url=/d"])
    assert trials[0].config.cluster.workers == 1  # the first trial is not the largest
    largest = cluster_config(trials)
    assert (largest.cluster.workers, largest.cluster.cpus_per_worker) == (3, 2)
    assert max_concurrent(8, largest) == 1
    # Settings fixed for the whole Ray cluster cannot vary between trials.
    for key, values in (("train.blas_numerics", ["portable", "native"]), ("cluster.use_gpu", [False, True])):
        trials = build_trials(spec_from_dict({"grid": {key: values}}), RunConfig(), "/sweep", ["data.url=/d"])
        with pytest.raises(ConfigError, match=f"{key} differs between trials"):
            cluster_config(trials)
    # With MKL_CBWR and ATEN_CPU_CAPABILITY set by the user the workers' environment is the same
    # either way.
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    trials = build_trials(spec_from_dict({"grid": {"train.blas_numerics": ["portable", "native"]}}), RunConfig(),
                          "/sweep", ["data.url=/d"])
    assert cluster_config(trials) is trials[0].config

def test_variants_set_several_keys_at_once_and_can_be_the_baseline():
    spec = spec_from_dict({"variants": {"tf4ctr": {"ssem": "ser", "dfm": "wsf", "loss": "tf"},
                                        "dualmlp": {"ssem": "share", "dfm": "sum", "loss": "bce"}},
                           "grid": {"train.batch_size": [1024, 4096]}, "seeds": [1, 2],
                           "baseline": {"variant": "dualmlp", "train.batch_size": 1024}})
    cells = expand_cells(spec)
    assert [c.label for c in cells] == ["variant=tf4ctr train.batch_size=1024", "variant=tf4ctr train.batch_size=4096",
                                        "variant=dualmlp train.batch_size=1024", "variant=dualmlp train.batch_size=4096"]
    assert baseline_label(spec, cells) == "variant=dualmlp train.batch_size=1024"
    trials = build_trials(spec, RunConfig(), "/sweep", ["data.url=/d"])
    assert len(trials) == 8
    by_cell = {t.cell.label: t.config for t in trials}
    tf, dual = by_cell["variant=tf4ctr train.batch_size=4096"], by_cell["variant=dualmlp train.batch_size=1024"]
    assert (tf.model.ssem, tf.model.dfm, tf.loss.loss, tf.train.batch_size) == ("ser", "wsf", "tf", 4096)
    assert (dual.model.ssem, dual.model.dfm, dual.loss.loss, dual.train.batch_size) == ("share", "sum", "bce", 1024)
    # A grid key on top of a variant's own key wins for its cells.
    over = spec_from_dict({"variants": {"a": {"ssem": "ser"}}, "grid": {"ssem": ["gm"]}})
    assert build_trials(over, RunConfig(), "/s", ["data.url=/d"])[0].config.model.ssem == "gm"


def test_variant_mistakes_are_refused_with_the_key():
    with pytest.raises(ConfigError, match=r"variants.tf4ctr.sem"):
        spec_from_dict({"variants": {"tf4ctr": {"sem": "ser"}}}, where="s.yaml")
    with pytest.raises(ConfigError, match="variants must map names to settings"):
        spec_from_dict({"variants": {"tf4ctr": "ser"}})
    with pytest.raises(ConfigError, match="cannot be set per variant"):
        spec_from_dict({"variants": {"a": {"train.seed": 3}}})
    with pytest.raises(ConfigError, match="variants' dimension"):
        spec_from_dict({"variants": {"a": {"ssem": "ser"}}, "grid": {"variant": ["a"]}})
    with pytest.raises(ConfigError, match="not swept"):
        spec_from_dict({"grid": {"ssem": ["ser"]}, "baseline": {"variant": "a"}})
    spec = spec_from_dict({"variants": {"a": {"ssem": "serr"}}})
    with pytest.raises(ConfigError, match="variant=a"):
        build_trials(spec, RunConfig(), "/sweep", ["data.url=/d"])


def _result(scores: list[float], improved: list[bool], monitor=("AUC", "gAUC")) -> dict:
    """A result.json with per-epoch validation AUC = gAUC = score / 2."""
    history = [{"epoch": i + 1, "valid": {"AUC": s / 2, "gAUC": s / 2, "logloss": 9.0}, "improved": imp}
               for i, (s, imp) in enumerate(zip(scores, improved))]
    return {"history": history, "config": {"train": {"monitor": list(monitor)}}}


def test_plateau_dynamics_reads_the_first_plateau_from_the_history():
    from tf4ctr_dist.studies.sweep import plateau_dynamics

    # stopped at its first plateau: epoch 3 did not improve, epoch 4 (lower lr) gained too little
    stopped = plateau_dynamics(_result([1.80, 1.85, 1.84, 1.845], [True, True, False, False]))
    assert stopped["first_plateau_epoch"] == 3 and stopped["passed_first_plateau"] == 0
    assert abs(stopped["plateau_gain"] - 0.005) < 1e-12  # the monitored sum, logloss left out
    passed = plateau_dynamics(_result([1.80, 1.85, 1.84, 1.86, 1.855, 1.85], [True, True, False, True, False, False]))
    assert passed["first_plateau_epoch"] == 3 and passed["passed_first_plateau"] == 1
    assert abs(passed["plateau_gain"] - 0.02) < 1e-12
    only_auc = plateau_dynamics(_result([1.80, 1.70, 1.90], [True, False, True], monitor=("AUC",)))
    assert abs(only_auc["plateau_gain"] - 0.10) < 1e-12
    never = plateau_dynamics(_result([1.80, 1.85], [True, True]))
    assert never == {"first_plateau_epoch": None, "plateau_gain": None, "passed_first_plateau": None}


def test_results_table_compares_the_plateau_dynamics_across_cells(tmp_path):
    from tf4ctr_dist.studies.sweep import _flat, write_results

    rows = []
    for seed, (a, b) in enumerate([(0.004, 0.001), (0.003, 0.0005), (0.005, 0.0012)]):
        for cell, gain in (("eager", a), ("kernel", b)):
            result = _result([1.80, 1.85, 1.84, 1.84 + gain], [True, True, False, gain > 0.01])
            rows.append({"cell": cell, "seed": seed, "status": "finished", **_flat(result)})
    write_results(str(tmp_path), rows, [], baseline="eager")
    table = (tmp_path / "results.md").read_text()
    kernel = next(line for line in table.splitlines() if line.startswith("| kernel"))
    assert "plateau_gain" in table and "passed_first_plateau" in table
    assert "0.000900 +- " in kernel  # mean of 0.001, 0.0005, 0.0012
    assert "(paired)" in kernel
    csv_text = (tmp_path / "results.csv").read_text()
    assert "first_plateau_epoch" in csv_text.splitlines()[0]


@pytest.mark.parametrize("where", ["local", "memory"])
def test_report_of_a_sweep_folder_draws_the_grid(tmp_path, where):
    """`tf4ctr report SWEEP` (a local folder or a URL) gives the heatmap of the mean test AUC over
    seeds for a two-key grid and the sweep's table (a URL was once taken for a plain run)."""
    pytest.importorskip("matplotlib")
    import json

    import fsspec

    from tf4ctr_dist.cli import main

    root = str(tmp_path / "sweep") if where == "local" else f"memory://sweeps/{tmp_path.name}"
    fs, path = fsspec.core.url_to_fs(root)
    fs.makedirs(path, exist_ok=True)
    spec = {"grid": {"alpha": [0.25, 0.5], "gamma": [1, 2]}, "seeds": [1, 2]}
    fs.pipe_file(f"{path}/sweep.json", json.dumps({"spec": spec, "baseline": None, "trials": {}}).encode())
    lines = ["cell,alpha,gamma,seed,status,test_AUC"]
    for alpha, gamma, auc1, auc2 in (("0.25", "1", 0.80, 0.82), ("0.25", "2", 0.70, 0.70),
                                     ("0.5", "1", 0.90, 0.92), ("0.5", "2", 0.60, 0.64)):
        for seed, auc in ((1, auc1), (2, auc2)):
            lines.append(f"a{alpha}-g{gamma},{alpha},{gamma},{seed},finished,{auc}")
    fs.pipe_file(f"{path}/results.csv", ("\n".join(lines) + "\n").encode())
    fs.pipe_file(f"{path}/results.md", b"| cell | test_AUC |\n")
    out = tmp_path / "report"
    assert main(["report", root, "--out", str(out)]) == 0
    assert (out / "sweep_heatmap.png").stat().st_size > 1000
    table = (out / "sweep.md").read_text()
    assert table.startswith("| cell | test_AUC |") and "sweep_heatmap.png" in table
