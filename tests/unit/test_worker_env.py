"""`train.blas_numerics` becomes the workers' MKL_CBWR and ATEN_CPU_CAPABILITY through the job's
runtime_env, unless the user chose them (in the environment, or in the submitted job's
runtime_env)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tf4ctr_dist.config import ConfigError, RunConfig
from tf4ctr_dist.train import launch
from tf4ctr_dist.train.launch import worker_env

PORTABLE = {"MKL_CBWR": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


@pytest.fixture(autouse=True)
def _no_user_choice(monkeypatch):
    for key in ("MKL_CBWR", "ATEN_CPU_CAPABILITY", "RAY_JOB_CONFIG_JSON_ENV_VAR"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(launch, "_has_avx2", lambda: True)


def test_portable_by_default():
    assert RunConfig().train.blas_numerics == "portable"
    assert worker_env(RunConfig()) == PORTABLE


def test_native_leaves_mkl_and_torch_to_choose():
    assert worker_env(RunConfig().with_overrides(["train.blas_numerics=native"])) == {}


def test_no_avx2_on_this_machine_leaves_torch_to_choose(monkeypatch):
    # torch would run AVX2 code on a CPU without it rather than refuse the setting
    monkeypatch.setattr(launch, "_has_avx2", lambda: False)
    assert worker_env(RunConfig()) == {"MKL_CBWR": "AVX2"}


def test_the_users_choice_wins(monkeypatch):
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
    assert worker_env(RunConfig()) == {"ATEN_CPU_CAPABILITY": "avx2"}
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx512")
    assert worker_env(RunConfig()) == {}


def test_a_submitted_jobs_runtime_env_wins(monkeypatch):
    job = {"runtime_env": {"env_vars": {"MKL_CBWR": "AVX512"}}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    assert worker_env(RunConfig()) == {"ATEN_CPU_CAPABILITY": "avx2"}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"env_vars": {"A": "1"}}}))
    assert worker_env(RunConfig()) == PORTABLE


def test_an_unknown_value_is_a_config_error():
    with pytest.raises(ConfigError, match="blas_numerics"):
        RunConfig().with_overrides(["train.blas_numerics=fast"])


def _capability_and_pow_bits(capability: str | None) -> tuple[str, str]:
    """torch's dispatch level in a fresh process, and the bits of x ** 1.7 over 375 floats."""
    code = ("import hashlib, torch; torch.manual_seed(0); x = torch.rand(375) * 4; "
            "print(torch.backends.cpu.get_cpu_capability(), hashlib.md5(x.pow(1.7).numpy().tobytes()).hexdigest())")
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    if capability:
        env["ATEN_CPU_CAPABILITY"] = capability
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    capability_seen, bits = out.stdout.split()
    return capability_seen, bits


def test_the_avx2_setting_takes_effect_and_matters_where_the_cpu_has_avx512():
    """Why the workers get ATEN_CPU_CAPABILITY: on an AVX-512 CPU torch's own kernels round some
    elements differently from AVX2 CPUs (375 = 11 * 32 + 23: the leftover elements differ)."""
    native, native_bits = _capability_and_pow_bits(None)
    pinned, pinned_bits = _capability_and_pow_bits("avx2")
    if native not in ("AVX2", "AVX512"):
        pytest.skip(f"torch runs {native} code here: the setting is not given on such CPUs")
    assert pinned == "AVX2"
    if native == "AVX512":
        assert native_bits != pinned_bits
    else:
        assert native_bits == pinned_bits
