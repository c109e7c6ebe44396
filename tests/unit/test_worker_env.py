"""`train.blas_numerics` becomes the workers' MKL_CBWR through the job's runtime_env, unless the
user chose one (in the environment, or in the submitted job's runtime_env)."""

from __future__ import annotations

import json

import pytest

from tf4ctr_dist.config import ConfigError, RunConfig
from tf4ctr_dist.train.launch import worker_env


@pytest.fixture(autouse=True)
def _no_user_choice(monkeypatch):
    monkeypatch.delenv("MKL_CBWR", raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)


def test_portable_by_default():
    assert RunConfig().train.blas_numerics == "portable"
    assert worker_env(RunConfig()) == {"MKL_CBWR": "AVX2"}


def test_native_leaves_mkl_to_choose():
    assert worker_env(RunConfig().with_overrides(["train.blas_numerics=native"])) == {}


def test_the_users_choice_wins(monkeypatch):
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
    assert worker_env(RunConfig()) == {}


def test_a_submitted_jobs_runtime_env_wins(monkeypatch):
    job = {"runtime_env": {"env_vars": {"MKL_CBWR": "AVX512"}}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    assert worker_env(RunConfig()) == {}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"env_vars": {"A": "1"}}}))
    assert worker_env(RunConfig()) == {"MKL_CBWR": "AVX2"}


def test_an_unknown_value_is_a_config_error():
    with pytest.raises(ConfigError, match="blas_numerics"):
        RunConfig().with_overrides(["train.blas_numerics=fast"])
