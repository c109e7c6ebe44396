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
