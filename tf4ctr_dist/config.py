"""Typed run configuration: YAML/JSON files plus dotted ``key=value`` overrides.

Every section is a dataclass; an unknown key anywhere is an error (no silent typos). Short keys
(``alpha=0.25``) resolve to the single section that owns them; dotted keys (``model.alpha=0.25``)
are always accepted.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional


class ConfigError(ValueError):
    """A configuration key or value is not valid."""


SSEM = Literal["share", "ser", "gm", "moe"]
DFM = Literal["sum", "wsf", "vf", "cf", "moef"]
LOSS = Literal["tf", "bce", "focal", "rce"]
EMB_OPTIMIZER = Literal["adam", "adagrad", "rowwise_adagrad", "sgd"]
SHARDING = Literal["auto", "data_parallel", "table_wise", "column_wise", "row_wise"]
EMB_REG_MODE = Literal["full", "touched"]
DENSE_PRECISION = Literal["fp32", "bf16"]
RESUME = Literal["auto", "never"]
TABLE_PRECISION = Literal["fp32", "fp16"]


@dataclass
class DataConfig:
    """Where the prepared dataset lives (a manifest.json at its root) and how to read it."""

    url: str = ""  # prepared Parquet dataset (local path, file:// or s3://)
    train_split: str = "train"
    valid_split: str = "valid"
    test_split: str = "test"
    shuffle: bool = True
    # Rows shuffled together in memory (whole row groups; each epoch also permutes row groups).
    shuffle_buffer_rows: int = 262_144


@dataclass
class ModelConfig:
    """TF4CTR architecture (SPEC sections 2-5)."""

    embedding_dim: int = 16
    ssem: SSEM = "ser"
    dfm: DFM = "wsf"
    easy_hidden_units: list[int] = field(default_factory=lambda: [400, 400])
    hard_hidden_units: list[int] = field(default_factory=lambda: [400, 400, 400])
    net_dropout: float = 0.2
    batch_norm: bool = True
    # bf16: MLP_s / MLP_c matmuls, BatchNorm and ReLU/dropout in bfloat16 (AMX / tensor cores);
    # fp32 parameters, optimizer state, embeddings, heads and loss. Changes numerics slightly.
    dense_precision: DENSE_PRECISION = "fp32"


@dataclass
class LossConfig:
    """Objective: main BCE plus (with loss=tf) the Twin Focus loss."""

    loss: LOSS = "tf"
    alpha: float = 0.25
    c: float = 0.7
    gamma: float = 1.0
    m: Optional[float] = None  # defaults to 2 - c
    focal_gamma: float = 2.0
    rce_max_drop_rate: float = 0.2
    rce_num_gradual: int = 10000


@dataclass
class TrainConfig:
    """Optimisation protocol (SPEC section 6). batch_size is the GLOBAL batch across workers."""

    batch_size: int = 10000
    eval_batch_size: int = 20000
    epochs: int = 100
    lr: float = 1e-3
    clip_grad_norm: float = 10.0
    # Clip data-parallel tables together with the dense parameters, as the authors' code does
    # (fused sharded tables are updated inside backward and never clipped).
    clip_embeddings: bool = True
    emb_reg: float = 0.0
    emb_reg_mode: EMB_REG_MODE = "full"
    embedding_optimizer: EMB_OPTIMIZER = "adam"
    embedding_lr: Optional[float] = None  # defaults to lr
    sharding: SHARDING = "auto"
    monitor: list[str] = field(default_factory=lambda: ["AUC", "gAUC"])
    patience: int = 2
    lr_decay: float = 0.1
    min_lr: float = 1e-6
    seed: int = 2023
    log_every: int = 50
    intra_op_threads: int = 0  # 0: cores / workers
    # Weights of fused (sharded) tables in half precision: half the memory and lookup traffic.
    table_precision: TABLE_PRECISION = "fp32"


@dataclass
class ClusterConfig:
    """How Ray Train lays out the workers."""

    workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    ray_address: Optional[str] = None  # None: connect to RAY_ADDRESS or start a local cluster
    max_failures: int = 0


@dataclass
class CheckpointConfig:
    """Distributed checkpoints (torch.distributed.checkpoint) and resuming."""

    enabled: bool = True
    root: Optional[str] = None  # default OUT/checkpoints (local path or s3://)
    every_steps: int = 0  # also every N training steps (0: only at the end of each epoch)
    keep: int = 2  # most recent checkpoints kept, plus the best one
    # auto: continue from the newest checkpoint under root when there is one; never: start over
    resume: RESUME = "auto"
    # A finished run (its OUT folder or checkpoint root): start from its best weights.
    warm_start: Optional[str] = None
    # Count how often every training sample is used per epoch (proves exactly-once after restarts).
    count_samples: bool = False


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    out: str = "runs/latest"
    name: str = "tf4ctr"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "RunConfig":
        return _build(cls, raw, "")

    def with_overrides(self, overrides: list[str] | dict[str, Any]) -> "RunConfig":
        """Apply ``key=value`` strings (or a {key: value} dict); returns a new config."""
        raw = self.to_dict()
        items = overrides.items() if isinstance(overrides, dict) else (_split(o) for o in overrides)
        for key, value in items:
            path = _resolve_key(key)
            target = raw
            for part in path[:-1]:
                target = target[part]
            target[path[-1]] = _parse_override(value, _declared_type(path)) if isinstance(value, str) else value
        return RunConfig.from_dict(raw)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML/JSON config file (or the defaults) and apply overrides."""
    cfg = RunConfig()
    if path is not None:
        text = Path(path).read_text()
        if str(path).endswith((".yaml", ".yml")):
            import yaml

            raw = yaml.safe_load(text) or {}
        else:
            raw = json.loads(text)
        try:
            cfg = RunConfig.from_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    return cfg.with_overrides(overrides or [])


def _split(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, value = item.split("=", 1)
    return key.strip(), value.strip()


def _parse_value(text: str) -> Any:
    if text.lower() in ("none", "null"):
        return None
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        import yaml

        return yaml.safe_load(text)
    except Exception:
        return text




def _declared_type(path: list[str]) -> Any:
    tp: Any = RunConfig
    for part in path:
        tp = typing.get_type_hints(tp)[part]
    return tp


def _parse_override(text: str, tp: Any) -> Any:
    """Override text -> value: YAML scalars/lists, except that a str field keeps the text as
    written (``name=2023``, ``train_split=001``) and an Optional[str] one only maps none/null."""
    if tp is str:
        return text
    if tp == Optional[str]:
        return None if text.lower() in ("none", "null") else text
    return _parse_value(text)


def _section_classes() -> dict[str, type]:
    hints = typing.get_type_hints(RunConfig)
    return {k: v for k, v in hints.items() if dataclasses.is_dataclass(v)}


def _resolve_key(key: str) -> list[str]:
    sections = _section_classes()
    parts = key.split(".")
    if len(parts) == 2 and parts[0] in sections:
        names = {f.name for f in dataclasses.fields(sections[parts[0]])}
        if parts[1] not in names:
            raise ConfigError(f"unknown config key {key!r}; {parts[0]} has: {', '.join(sorted(names))}")
        return parts
    if len(parts) == 1:
        if parts[0] in {f.name for f in dataclasses.fields(RunConfig)} and parts[0] not in sections:
            return parts
        owners = [s for s, c in sections.items() if parts[0] in {f.name for f in dataclasses.fields(c)}]
        if len(owners) == 1:
            return [owners[0], parts[0]]
        if len(owners) > 1:
            raise ConfigError(f"config key {key!r} is ambiguous; use one of {[o + '.' + key for o in owners]}")
    raise ConfigError(f"unknown config key {key!r}")


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(repr((where + '.' if where else '') + u) for u in unknown)}; "
            f"{where or 'top level'} accepts: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in raw.items():
        key = f"{where}.{name}" if where else name
        kwargs[name] = _coerce(hints[name], value, key)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            # "64,32" (a comma list on the command line): each item parsed like a scalar value.
            value = [value] if not isinstance(value, str) else [_parse_value(v.strip()) for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(args[0], v, key) for v in value]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value
