"""The package as a user installs it: the wheel's metadata and data, the pins, the fast CLI."""

from __future__ import annotations

import subprocess
import sys
import time
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pins(name: str, seen: set | None = None) -> dict[str, Requirement]:
    """requirements/NAME.txt with its -r includes: {normalised name: requirement}."""
    out: dict[str, Requirement] = {}
    for line in (ROOT / "requirements" / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("-r "):
            out.update(_pins(line[3:].strip()))
            continue
        req = Requirement(line)
        out[_norm(req.name)] = req
    return out


def _norm(name: str) -> str:
    return name.lower().replace("_", "-")


def _pinned_version(req: Requirement) -> str:
    (spec,) = list(req.specifier)
    assert spec.operator == "==", f"requirements pin exact versions: {req}"
    return spec.version


@pytest.mark.parametrize("pins, extra", [("cpu.txt", "cpu"), ("gpu.txt", "gpu"), ("test.txt", "test"),
                                         ("report.txt", "report")])
def test_requirements_agree_with_pyproject(pins: str, extra: str) -> None:
    """Each pinned set holds exactly what pyproject declares (dependencies + the extra), at
    versions inside pyproject's ranges; torchrec is pinned in requirements/torchrec.txt."""
    project = _pyproject()["project"]
    declared = [Requirement(r) for r in project["optional-dependencies"][extra]]
    if extra not in ("test", "report"):
        declared += [Requirement(r) for r in project["dependencies"]]
    pinned = _pins(pins)
    if extra == "gpu":
        pinned.update(_pins("torchrec.txt"))
    for req in declared:
        name = _norm(req.name)
        assert name in pinned, f"{req.name} is declared in pyproject.toml but not pinned in requirements/{pins}"
        version = _pinned_version(pinned[name])
        assert req.specifier.contains(version, prereleases=True), (
            f"requirements/{pins} pins {req.name}=={version}, outside pyproject's {req.specifier}")
        assert set(pinned[name].extras) == set(req.extras), f"{req.name}: extras differ"
    extra_pins = set(pinned) - {_norm(r.name) for r in declared}
    assert not extra_pins, f"requirements/{pins} pins {sorted(extra_pins)} that pyproject.toml does not declare"


def test_dev_sh_installs_torchrec_from_its_pin() -> None:
    assert "--no-deps -r requirements/torchrec.txt" in (ROOT / "dev.sh").read_text()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    import shutil

    # Built from a copy: setuptools leaves build/ and *.egg-info in the source folder.
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for package in ("tf4ctr_dist", "data_tools"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(src)], check=True, capture_output=True, timeout=300)
    (path,) = out.glob("tf4ctr_dist-*.whl")
    return path


def test_wheel_lists_runtime_dependencies_and_ships_presets(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = Parser().parsestr(z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode())
        entry_points = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    requires = [Requirement(r) for r in meta.get_all("Requires-Dist")]
    base = {_norm(r.name) for r in requires if r.marker is None}
    assert {"torch", "ray", "pyarrow", "fsspec", "s3fs", "pyyaml"} <= base
    by_extra = {e: {_norm(r.name) for r in requires if r.marker is not None and r.marker.evaluate({"extra": e})}
                for e in ("cpu", "gpu", "test")}
    assert "fbgemm-gpu-cpu" in by_extra["cpu"] and "fbgemm-gpu" in by_extra["gpu"] and "torchrec" in by_extra["gpu"]
    assert "pytest" in by_extra["test"]
    presets = {Path(n).name for n in names if n.startswith("tf4ctr_dist/presets/")}
    assert {"demo.yaml", "criteo_x4.yaml", "frappe_x1.yaml"} <= presets
    assert any(n.endswith(".cpp") for n in names), "the CPU kernels' sources must ship with the package"
    assert "tf4ctr = tf4ctr_dist.cli:main" in entry_points


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_cli_help_lists_commands_fast() -> None:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "tf4ctr_dist", "--help"], capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - t0
    assert r.returncode == 0
    for command in ("prepare", "check", "train", "retrain", "plan"):
        assert f"\n    {command}" in r.stdout, r.stdout
    assert elapsed < 3.0, f"tf4ctr --help took {elapsed:.1f}s"  # under 1 s on an idle machine


def test_importing_the_cli_imports_no_torch_torchrec_or_ray() -> None:
    r = _run("import sys, tf4ctr_dist.cli\n"
             "import tf4ctr_dist.cli.train, tf4ctr_dist.cli.plan, tf4ctr_dist.cli.data\n"
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchrec', 'ray', 'pyarrow')))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout


def test_driver_placement_check_imports_no_torchrec() -> None:
    r = _run("import sys\nfrom tf4ctr_dist.distributed.placement import check_run_config\n"
             "from tf4ctr_dist.config import RunConfig\ncheck_run_config(RunConfig(), 'cpu', 2)\n"
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torchrec', 'ray', 'fbgemm_gpu')))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout
