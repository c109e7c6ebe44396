"""jobs/retrain.py's argument checks, before any worker starts."""

from __future__ import annotations

import pytest

from tf4ctr_dist.config import ConfigError
from tf4ctr_dist.entry import retrain


def test_from_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(ConfigError, match=r"--from .*not-a-run: no config.json there"):
        retrain(["--from", str(tmp_path / "not-a-run"), "--data", str(tmp_path / "d")])


def test_data_and_logs_are_exclusive(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        retrain(["--from", str(tmp_path), "--data", "x", "--logs", "y"])
    assert exc.value.code == 2 and "exactly one of --data" in capsys.readouterr().err


def test_logs_need_a_spec(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SystemExit):
        retrain(["--from", str(tmp_path), "--logs", str(tmp_path / "logs"), "--out", str(tmp_path / "o")])
    assert "--logs needs --spec" in capsys.readouterr().err


def test_unknown_key_in_the_source_config_is_an_error(tmp_path):
    (tmp_path / "config.json").write_text('{"model": {"embeding_dim": 8}}')
    with pytest.raises(ConfigError, match="embeding_dim"):
        retrain(["--from", str(tmp_path), "--data", "x"])
