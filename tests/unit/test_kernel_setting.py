"""train.cpu_kernels=auto|on|off: `on` fails clearly where the kernels cannot be built, `auto`
falls back with one warning, `off` never builds; and no config trains different maths on two
machines: embedding weight decay on fused CPU tables that fbgemm's kernel would train (it drops
the decay) is refused, on the driver where that is known there, else in the worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tf4ctr_dist.config import ConfigError, RunConfig
from tf4ctr_dist.distributed.placement import check_run_config, resolve_placement
from tf4ctr_dist.kernels import KernelUnavailable, build, load
from tf4ctr_dist.train.setup import load_cpu_kernels

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
# the demo's table settings: fused row-wise Adagrad tables with L2 on the touched rows
DECAYED = ["sharding=table_wise", "embedding_optimizer=rowwise_adagrad", "emb_reg=1e-5", "emb_reg_mode=touched"]


def _cfg(*overrides: str) -> RunConfig:
    return RunConfig().with_overrides(list(overrides))


# Run in a fresh interpreter: torch's extension builder versions a name whose build directory
# changed (name_v1, ...), so a failed build in this process followed by the real one would load
# a second copy of the library (the dispatcher aborts on a second TORCH_LIBRARY(tf4ctr)).
_UNBUILDABLE = """
import json, warnings
from tf4ctr_dist.config import ConfigError, RunConfig
from tf4ctr_dist.distributed.placement import check_run_config
from tf4ctr_dist.kernels import build, load
from tf4ctr_dist.train.setup import load_cpu_kernels
import torch

out = {}
try:
    load("on")
    out["on"] = None
except ConfigError as e:
    out["on"] = [type(e).__name__, str(e)]
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    out["auto"] = [load("auto") is None, load("auto") is None, build.loaded() is None]
out["auto_warnings"] = [str(w.message) for w in seen if w.category is RuntimeWarning]
cfg = RunConfig().with_overrides(%(decayed)r)
placement = check_run_config(cfg, "cpu", 2)  # the driver cannot know
try:
    load_cpu_kernels(cfg, placement, torch.device("cpu"))
    out["worker_decay"] = None
except ConfigError as e:
    out["worker_decay"] = str(e)
out["worker_no_decay"] = load_cpu_kernels(RunConfig().with_overrides(%(decayed)r + ["emb_reg=0"]), placement,
                                          torch.device("cpu"))[1]
print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def unbuildable(tmp_path_factory) -> dict:
    """What a machine whose C++ compiler is missing does: a fresh kernel cache and $CXX pointing
    nowhere, the real build path."""
    tmp = tmp_path_factory.mktemp("unbuildable")
    env = {**os.environ, "TF4CTR_KERNEL_DIR": str(tmp / "kernels"), "CXX": str(tmp / "no-such-compiler" / "g++"),
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", _UNBUILDABLE % {"decayed": DECAYED}], capture_output=True,
                          text=True, timeout=300, cwd=tmp, env=env)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")]
    assert proc.returncode == 0 and line, proc.stdout + proc.stderr
    return json.loads(line[0].removeprefix("RESULT"))


def test_on_fails_clearly_where_the_kernels_cannot_be_built(unbuildable):
    kind, message = unbuildable["on"]
    assert kind == "KernelUnavailable"  # a ConfigError: the CLI prints it as one line
    assert issubclass(KernelUnavailable, ConfigError)
    assert message.startswith("cpu_kernels=on but the CPU kernels could not be built or loaded on this machine")
    assert "no-such-compiler" in message or "g++" in message  # why, from the builder
    assert "set cpu_kernels=auto (fall back to the eager ops) or off" in message


def test_auto_falls_back_with_one_warning(unbuildable):
    assert unbuildable["auto"] == [True, True, True]
    # one warning over two loads and the worker's two (tried once per process, warned once)
    assert len(unbuildable["auto_warnings"]) == 1
    assert "could not be built" in unbuildable["auto_warnings"][0]
    assert "cpu_kernels=auto runs the eager ops" in unbuildable["auto_warnings"][0]


def test_off_never_builds(monkeypatch):
    def no_build():
        raise AssertionError("cpu_kernels=off tried to build the kernels")

    monkeypatch.setattr(build, "_build", no_build)
    assert load("off") is None


def test_an_unknown_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="cpu_kernels='yes': expected one of auto, on, off"):
        load("yes")


def test_the_config_key_is_typed():
    assert RunConfig().train.cpu_kernels == "auto"
    assert _cfg("cpu_kernels=off").train.cpu_kernels == "off"
    with pytest.raises(ConfigError, match="cpu_kernels"):
        _cfg("cpu_kernels=maybe")


# ---- weight decay: apply it or refuse ---------------------------------------------------------

def test_driver_refuses_decay_that_fbgemm_would_drop_with_kernels_off():
    with pytest.raises(ConfigError, match=r"emb_reg=1e-05 on fused CPU row-wise Adagrad tables needs this "
                                          r"package's table kernel, but cpu_kernels=off.*silently drop"):
        check_run_config(_cfg(*DECAYED, "cpu_kernels=off"), "cpu", 2)


@pytest.mark.parametrize("optimizer", ["adagrad", "sgd"])
def test_driver_refuses_decay_with_fbgemms_cpu_adagrad_and_sgd(optimizer):
    with pytest.raises(ConfigError, match=f"embedding_optimizer={optimizer} on fused CPU tables: fbgemm's CPU "
                                          f"{optimizer} kernel ignores weight decay"):
        check_run_config(_cfg(*DECAYED, f"embedding_optimizer={optimizer}"), "cpu", 2)


@pytest.mark.parametrize("overrides,device", [
    ([*DECAYED], "cpu"),  # auto/on: the worker checks what it loaded
    ([*DECAYED, "cpu_kernels=on"], "cpu"),
    ([*DECAYED, "cpu_kernels=off", "emb_reg=0"], "cpu"),  # no decay to drop
    ([*DECAYED, "cpu_kernels=off"], "cuda"),  # fbgemm's GPU kernels apply it
    ([*DECAYED, "embedding_optimizer=sgd", "emb_reg=0"], "cpu"),
    (["sharding=data_parallel", "embedding_optimizer=adam", "emb_reg=0.1", "emb_reg_mode=full",
      "cpu_kernels=off"], "cpu"),  # dense tables: the penalty is this package's own
])
def test_driver_accepts_what_trains_the_same_everywhere(overrides, device):
    check_run_config(_cfg(*overrides), device, 2)


def test_worker_refuses_decay_where_auto_could_not_build(unbuildable):
    assert "the CPU kernels could not be built on this machine" in unbuildable["worker_decay"]
    assert "fbgemm's CPU kernel would silently drop the weight decay" in unbuildable["worker_decay"]
    # without decay the fallback trains the same maths up to rounding: allowed, and recorded
    assert unbuildable["worker_no_decay"] == {"setting": "auto", "bn_relu_dropout": False, "table_backward": "fbgemm"}


@pytest.mark.parametrize("overrides,record", [
    (DECAYED, {"setting": "auto", "bn_relu_dropout": True, "table_backward": "tf4ctr"}),
    ([*DECAYED, "cpu_kernels=on", "dense_precision=bf16"],
     {"setting": "on", "bn_relu_dropout": False, "table_backward": "tf4ctr"}),  # the BN kernel is float32 only
    (["sharding=data_parallel", "embedding_optimizer=adam"],
     {"setting": "auto", "bn_relu_dropout": True, "table_backward": "torch"}),
    (["sharding=table_wise", "embedding_optimizer=rowwise_adagrad", "cpu_kernels=off"],
     {"setting": "off", "bn_relu_dropout": False, "table_backward": "fbgemm"}),
])
def test_worker_records_what_runs(overrides, record):
    cfg = _cfg(*overrides)
    kernels, got = load_cpu_kernels(cfg, check_run_config(cfg, "cpu", 1), CPU)
    assert got == record
    assert (kernels is not None) is (cfg.train.cpu_kernels != "off")


def test_gpu_workers_do_not_build_the_cpu_kernels(monkeypatch):
    monkeypatch.setattr(build, "_build", lambda: pytest.fail("built the CPU kernels for a GPU worker"))
    cfg = _cfg(*DECAYED, "cpu_kernels=on")
    kernels, record = load_cpu_kernels(cfg, resolve_placement("table_wise", "rowwise_adagrad", "cuda"),
                                       torch.device("cuda"))
    assert kernels is None and record == {"setting": "on", "bn_relu_dropout": False, "table_backward": "fbgemm"}


_PROBE = """
import sys
from tf4ctr_dist.cli import main
code = main(sys.argv[1:])
print("RAY_IMPORTED" if "ray" in sys.modules else "NO_RAY")
sys.exit(code)
"""


def test_tf4ctr_train_refuses_kernels_off_with_decay_before_ray(tmp_path):
    """The demo's table settings (fused row-wise Adagrad tables, emb_reg 1e-5) with
    cpu_kernels=off: one line on the driver, no Ray."""
    from data_tools.synthetic import generate_synthetic

    url = str(tmp_path / "synthetic")
    generate_synthetic(url, rows=2_000, fields=4, scale_vocab=0.01, seed=3, row_group_rows=500)
    proc = subprocess.run([sys.executable, "-c", _PROBE, "train", "--data", url, "--out", str(tmp_path / "run"),
                           *DECAYED, "cpu_kernels=off"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "needs this package's table kernel, but cpu_kernels=off" in proc.stderr + proc.stdout
    assert "NO_RAY" in proc.stdout
