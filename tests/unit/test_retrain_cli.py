"""`tf4ctr retrain`'s argument checks, before any worker starts: one line, a non-zero exit."""

from __future__ import annotations

from tf4ctr_dist.cli import main


def _run(capsys, *argv: str) -> tuple[int, str]:
    code = main(["retrain", *argv])
    return code, capsys.readouterr().err


def test_from_a_folder_that_is_not_a_run(tmp_path, capsys):
    code, err = _run(capsys, "--from", str(tmp_path / "not-a-run"), "--data", str(tmp_path / "d"))
    assert code == 2 and "--from" in err and "not-a-run: no config.json there" in err


def test_data_and_logs_are_exclusive(tmp_path, capsys):
    code, err = _run(capsys, "--from", str(tmp_path), "--data", "x", "--logs", "y")
    assert code == 2 and "exactly one of --data" in err


def test_logs_need_a_spec(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    code, err = _run(capsys, "--from", str(tmp_path), "--logs", str(tmp_path / "logs"), "--out", str(tmp_path / "o"))
    assert code == 2 and "--logs needs --spec" in err


def test_unknown_key_in_the_source_config_is_an_error(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"model": {"embeding_dim": 8}}')
    code, err = _run(capsys, "--from", str(tmp_path), "--data", "x")
    assert code == 2 and "embeding_dim" in err and "did you mean 'model.embedding_dim'" in err


def test_missing_new_dataset_is_refused_before_ray(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    code, err = _run(capsys, "--from", str(tmp_path), "--data", str(tmp_path / "nothing-here"), "--out", str(tmp_path / "o"))
    assert code == 1 and "no manifest.json" in err


def test_the_source_run_does_not_choose_the_ray_cluster(tmp_path, monkeypatch):
    """A run folder may come from someone else: its settings are taken, its cluster.ray_address is
    not (only --ray-address chooses where this job runs)."""
    import json

    from data_tools.synthetic import generate_synthetic
    import tf4ctr_dist.cli.train as train_cli

    data = str(tmp_path / "data")
    generate_synthetic(data, rows=400, fields=3, scale_vocab=0.01, seed=3, row_group_rows=100)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps(
        {"cluster": {"ray_address": "ray://somebody-else:10001", "workers": 2}, "train": {"batch_size": 64}}))
    launched = []
    monkeypatch.setattr(train_cli, "launch", lambda cfg, checked=None: launched.append(cfg))
    for extra in ([], ["--ray-address", "127.0.0.1:6379"]):
        assert main(["retrain", "--from", str(tmp_path / "run"), "--data", data, "--out", str(tmp_path / "o"),
                     *extra]) == 0
    first, second = launched
    assert first.cluster.ray_address is None and first.cluster.workers == 2 and first.train.batch_size == 64
    assert second.cluster.ray_address == "127.0.0.1:6379"
