"""cluster/: Ray launcher config, KubeRay RayJob, runtime env and README stay valid and safe.

Checks: YAML parses, required keys per kind, every repo script a command runs exists, every flag
handed to jobs/criteo_full.py is accepted by its real argparse parser (and every key=value is a
real config key), and no file holds a literal AWS key.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from tf4ctr_dist.config import load_config
from tf4ctr_dist.cli.train import train_parser as criteo_full_parser
from tf4ctr_dist.config import PRESETS_DIR as CONFIGS

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
# Where cluster files put the repository on the nodes / in the image.
REPO_MOUNTS = ("~/tf4ctr/", "/home/ray/tf4ctr/", "$HOME/tf4ctr/")
SCRIPT_SUFFIXES = (".py", ".sh", ".txt")
JOB_SCRIPT = "jobs/criteo_full.py"

AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")
AWS_SECRET = re.compile(r"aws_secret_access_key[\"']?\s*[:=]\s*[\"']?[A-Za-z0-9/+=]{16,}", re.IGNORECASE)
SECRET_ENV_NAMES = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}


def _yaml_files() -> list[Path]:
    return sorted(p for p in CLUSTER.iterdir() if p.suffix in (".yaml", ".yml"))


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _kind(doc: Any) -> str:
    if isinstance(doc, dict) and doc.get("kind") == "RayJob":
        return "rayjob"
    if isinstance(doc, dict) and "provider" in doc and "available_node_types" in doc:
        return "launcher"
    if isinstance(doc, dict) and "working_dir" in doc:
        return "runtime_env"
    return "unknown"


def _docs_of_kind(kind: str) -> list[tuple[Path, Any]]:
    found = [(p, _load(p)) for p in _yaml_files()]
    return [(p, d) for p, d in found if _kind(d) == kind]


def _segments(command: str) -> Iterator[list[str]]:
    """Shell words of each simple command in ``command`` (split at ; && || |)."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    words: list[str] = []
    for tok in lexer:
        if tok and set(tok) <= set(";&|"):
            if words:
                yield words
            words = []
        else:
            words.append(tok)
    if words:
        yield words


def _commands() -> list[tuple[str, str]]:
    """(where, command line) for every command the cluster files run."""
    out: list[tuple[str, str]] = []
    for path, doc in _docs_of_kind("launcher"):
        for key in ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                    "head_start_ray_commands", "worker_start_ray_commands"):
            out += [(f"{path.name}:{key}", c) for c in doc.get(key) or []]
    for path, doc in _docs_of_kind("rayjob"):
        out.append((f"{path.name}:spec.entrypoint", doc["spec"]["entrypoint"]))
        for c in _containers(doc):
            for key in ("command", "args"):
                if c.get(key):
                    out.append((f"{path.name}:{c['name']}.{key}", shlex.join(c[key])))
    for i, block in enumerate(_readme_code_blocks()):
        out += [(f"README.md block {i}", line) for line in block]
    for path in _yaml_files():  # usage examples in comments
        out += [(f"{path.name} comment", line) for line in _comment_commands(path)]
    return out


def _comment_commands(path: Path) -> list[str]:
    """Comment lines of a YAML file that run jobs/criteo_full.py (continuations joined)."""
    comments = [ln.strip()[1:].strip() for ln in path.read_text().splitlines() if ln.strip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(comments))
    return [ln for ln in joined.splitlines() if re.search(r"\bpython[0-9.]*\s+(\./)?" + re.escape(JOB_SCRIPT), ln)]


def _readme_code_blocks() -> list[list[str]]:
    """Shell code blocks of cluster/README.md as logical lines (backslash continuations joined)."""
    text = (CLUSTER / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, flags=re.S)
    result = []
    for block in blocks:
        joined = re.sub(r"\\\n\s*", " ", block)
        result.append([ln.strip() for ln in joined.splitlines() if ln.strip() and not ln.strip().startswith("#")])
    return result


def _containers(doc: dict) -> list[dict]:
    spec = doc["spec"]["rayClusterSpec"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def _walk(node: Any) -> Iterator[Any]:
    yield node
    if isinstance(node, dict):
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def _repo_path(word: str) -> str | None:
    """The repository-relative path a shell word names, if it names a repo script."""
    word = word.split("=", 1)[1] if word.startswith("-") and "=" in word else word
    for mount in REPO_MOUNTS:
        if word.startswith(mount):
            word = word[len(mount):]
            break
    else:
        if word.startswith(("~", "/", "$")) or "://" in word:
            return None
    word = word.removeprefix("./")
    return word if word.endswith(SCRIPT_SUFFIXES) and "=" not in word else None


# ---- structure --------------------------------------------------------------------------------


def test_every_cluster_file_is_known_and_parses():
    names = {p.name for p in CLUSTER.iterdir()}
    assert {"ray-cluster.yaml", "rayjob-criteo.yaml", "runtime_env.yaml", "README.md"} <= names
    for path in _yaml_files():
        doc = _load(path)
        assert _kind(doc) != "unknown", f"{path.name}: not a launcher config, RayJob or runtime env"


def test_launcher_config_has_required_keys():
    (path, doc), = _docs_of_kind("launcher")
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type"):
        assert key in doc, f"{path.name}: missing {key}"
    assert doc["provider"]["type"] == "aws" and doc["provider"]["region"]
    types = doc["available_node_types"]
    assert doc["head_node_type"] in types
    assert any(t != doc["head_node_type"] for t in types), "no worker node type"
    for name, node in types.items():
        assert "node_config" in node and "InstanceType" in node["node_config"], name
    workers = [v for k, v in types.items() if k != doc["head_node_type"]]
    assert any(w["node_config"]["InstanceType"].startswith(("p4", "p5", "g5", "g6")) for w in workers)
    setup = " ".join(doc.get("setup_commands", []))
    assert "dev.sh setup" in setup or "requirements/gpu.txt" in setup
    assert any(src in (".", "./") for src in doc["file_mounts"].values()), "the repo is not mounted"
    assert ".venv" in doc.get("rsync_exclude", [])


def test_rayjob_has_required_keys():
    (path, doc), = _docs_of_kind("rayjob")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    assert JOB_SCRIPT in spec["entrypoint"]
    cluster = spec["rayClusterSpec"]
    assert "headGroupSpec" in cluster and cluster["workerGroupSpecs"]
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"] and group["replicas"] >= 1
    gpus = [c["resources"]["limits"].get("nvidia.com/gpu") for c in _containers(doc)]
    assert any(gpus), "no container asks for GPUs"
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"]


def test_runtime_env_has_working_dir_and_excludes_local_state():
    (path, doc), = _docs_of_kind("runtime_env")
    assert doc["working_dir"]
    excludes = " ".join(doc.get("excludes", []))
    for local in (".venv", "runs", ".tf4ctr-cache"):
        assert local in excludes, f"{path.name}: {local} would be uploaded"


# ---- commands ---------------------------------------------------------------------------------


def test_every_script_a_command_runs_exists():
    checked = 0
    for where, command in _commands():
        for words in _segments(command):
            for word in words:
                rel = _repo_path(word)
                if rel is None:
                    continue
                checked += 1
                assert (ROOT / rel).is_file(), f"{where}: {word!r} -> {rel} is not in the repository"
    assert checked >= 3  # dev.sh and jobs/criteo_full.py at least


def _job_invocations() -> list[tuple[str, list[str]]]:
    found = []
    for where, command in _commands():
        for words in _segments(command):
            for i, word in enumerate(words):
                if word.removeprefix("./").endswith(JOB_SCRIPT):
                    found.append((where, words[i + 1:]))
    return found


def test_criteo_full_flags_are_accepted_by_its_parser():
    invocations = _job_invocations()
    wheres = {w.split(":")[0].split(" ")[0] for w, _ in invocations}
    assert {"rayjob-criteo.yaml", "README.md"} <= wheres, wheres
    for where, args in invocations:
        parser = criteo_full_parser()
        try:
            ns = parser.parse_args(args)
        except SystemExit:
            pytest.fail(f"{where}: jobs/criteo_full.py rejects {shlex.join(args)!r}")
        load_config(CONFIGS / "criteo_x4.yaml", ns.overrides)  # key=value overrides must be real keys
        if "rayjob" in where:
            assert ns.data and ns.data.startswith("s3://") and ns.gpu and ns.workers
            assert ns.out and "://" in ns.out, "multi-node runs need a shared --out URL"


def test_parser_check_catches_unknown_flags():
    with pytest.raises(SystemExit):
        criteo_full_parser().parse_args(["--data", "s3://b/c", "--num-gpus", "8"])


# ---- secrets ----------------------------------------------------------------------------------


def _find_aws_keys(text: str) -> list[str]:
    return AWS_KEY_ID.findall(text) + AWS_SECRET.findall(text)


def test_key_detector_works():
    fake_id = "AKIA" + "ABCDEFGHIJKLMNOP"
    fake_secret = "aws_secret_access_key: " + "abcd/EFGH+ijkl1234MNOPqrst5678uvwx"
    assert _find_aws_keys(f"id = {fake_id}") and _find_aws_keys(fake_secret)
    assert not _find_aws_keys('--from-literal=AWS_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY"')


@pytest.mark.parametrize("path", sorted(CLUSTER.iterdir()), ids=lambda p: p.name)
def test_no_literal_aws_keys(path):
    assert not _find_aws_keys(path.read_text()), f"{path.name} contains an AWS key"


def test_credentials_come_from_secrets():
    for path in _yaml_files():
        for node in _walk(_load(path)):
            if isinstance(node, dict) and node.get("name") in SECRET_ENV_NAMES:
                assert "value" not in node, f"{path.name}: {node['name']} has a literal value"
                assert "secretKeyRef" in node.get("valueFrom", {}), f"{path.name}: {node['name']} not from a secret"
