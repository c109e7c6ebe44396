"""Typed run configuration: YAML/JSON files plus dotted ``key=value`` overrides.

Every section is a dataclass; an unknown key anywhere is an error (no silent typos). Short keys
(``alpha=0.25``) resolve to the single section that owns them; dotted keys (``model.alpha=0.25``)
are always accepted.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional


class ConfigError(ValueError):
    """A configuration key or value is not valid."""


SSEM = Literal["share", "ser", "gm", "moe"]
DFM = Literal["sum", "wsf", "vf", "cf", "moef"]
LOSS = Literal["tf", "bce", "focal", "rce", "tce"]
# The twin branches' encoders (tf4ctr_dist/modules/encoders.py): none = no branch (DNN), lr = the
# first-order term, fm, cross = DCN's CrossNet, crossv2 = DCNv2's, cin = xDeepFM's, attention =
# AutoInt's interacting layers, afn = AFN's logarithmic layer + MLP.
ENCODER = Literal["mlp", "none", "lr", "fm", "cross", "crossv2", "cin", "attention", "afn"]
FIRST_ORDER = Literal["none", "easy", "hard"]
EMB_OPTIMIZER = Literal["adam", "adagrad", "rowwise_adagrad", "sgd"]
SHARDING = Literal["auto", "data_parallel", "table_wise", "column_wise", "row_wise"]
EMB_REG_MODE = Literal["full", "touched"]
DENSE_PRECISION = Literal["fp32", "bf16"]
INFERENCE = Literal["fused", "eager"]
INFERENCE_PRECISION = Literal["auto", "fp32", "bf16"]
RESUME = Literal["auto", "never"]
TABLE_PRECISION = Literal["fp32", "fp16"]
CPU_KERNELS = Literal["auto", "on", "off"]
BLAS_NUMERICS = Literal["portable", "native"]

# Presets ship inside the package (package data), so an installed wheel has them too.
PRESETS_DIR = Path(__file__).resolve().parent / "presets"


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
    # How long reads and checkpoint writes ride out transient storage errors (refused
    # connections, timeouts, 5xx, throttling) before failing with "cannot reach ..."; 0: no retry.
    storage_retry_seconds: float = 300.0


@dataclass
class EncoderConfig:
    """Options of the non-MLP encoders (model.encoders.KEY or just KEY on the command line)."""

    cross_layers: int = 3  # cross / crossv2 layers
    low_rank: int = 0  # crossv2: 0 = full-rank W; r > 0 = mixture of low-rank (r) experts
    num_experts: int = 4  # crossv2 with low_rank > 0
    cin_layer_units: list[int] = field(default_factory=lambda: [16, 16, 16])
    attention_layers: int = 2
    attention_heads: int = 1
    attention_dim: int = 8
    attention_residual: bool = True
    attention_scale: bool = False  # divide the scores by sqrt(head dim) (AutoInt: no)
    attention_layer_norm: bool = False
    afn_neurons: int = 5  # logarithmic neurons
    afn_hidden_units: list[int] = field(default_factory=lambda: [400, 400, 400])
    # Add the first-order (LR) term to this branch's logit (xDeepFM: easy with cin).
    first_order: FIRST_ORDER = "none"
    # false: no bias in the complex head; with dfm=sum z = W_s v_s + b_s + W_c v_c is then exactly
    # DCN's / DCNv2's single concatenated head Linear([v_s, v_c]).
    hard_head_bias: bool = True


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
    # The MLP towers' forward in evaluation, predict and serve. fused: BatchNorm folded into the
    # Linear (its running statistics are constants there) and Linear + ReLU as one oneDNN op on
    # CPU; equal to eager up to float rounding. eager: the training ops with dropout off.
    inference: INFERENCE = "fused"
    # Their matmuls in evaluation / predict / serve: auto = dense_precision; bf16 on an fp32 model
    # roughly doubles inference speed on CPUs with bf16 dot products (AVX512-BF16, AMX) and moves
    # probabilities by about 1e-4 (BENCHMARKS.md); metrics computed under it differ accordingly.
    # On CPUs without them (AVX2 only) bf16 runs torch's portable matmul: several times slower.
    inference_precision: INFERENCE_PRECISION = "auto"
    # mlp/mlp is TF4CTR as published; the others give the paper's backbones (presets dnn, deepfm, ...).
    easy_encoder: ENCODER = "mlp"
    hard_encoder: ENCODER = "mlp"
    encoders: EncoderConfig = field(default_factory=EncoderConfig)


@dataclass
class LossConfig:
    """Objective: main BCE plus (with loss=tf) the Twin Focus loss."""

    loss: LOSS = "tf"
    alpha: float = 0.25
    c: float = 0.7
    gamma: float = 1.0
    m: Optional[float] = None  # defaults to 2 - c
    focal_gamma: float = 2.0
    # tce: truncated CE (Wang et al. 2021): drop the largest-loss samples, rate growing to max
    tce_max_drop_rate: float = 0.2
    tce_num_gradual: int = 10000
    # rce: reweighted CE (Wang et al. 2021): weight pred^beta (positives), (1-pred)^beta (negatives)
    rce_beta: float = 0.25


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
    # This package's compiled CPU kernels (tf4ctr_dist/kernels): on = required (the run fails if
    # they cannot be built), auto = used where they build, off = eager ops and fbgemm's kernels.
    cpu_kernels: CPU_KERNELS = "auto"
    # CPU numerics: portable = the AVX2 code paths of MKL and of torch's own kernels on every CPU
    # that has AVX2 (MKL_CBWR=AVX2 and ATEN_CPU_CAPABILITY=avx2 in the workers), so a seed trains
    # the same model on another CPU model; native = both pick per CPU (AVX-512 where present).
    # A value the user set for either variable wins.
    blas_numerics: BLAS_NUMERICS = "portable"
    # BatchNorm statistics in training over the global batch across all workers (true), or over
    # each worker's batch_size / workers rows (false, as DDP does by default). Worth it when the
    # per-worker batch is small (README "Results": 512 rows per worker at batch 1024 cost Frappe
    # test AUC). Costs two small collectives per BatchNorm layer and step with the compiled CPU
    # kernel (which then runs in halves around them), three with the eager ops (BENCHMARKS.md
    # method 1c). No effect with one worker.
    sync_batch_norm: bool = False
    # Per-epoch analyses written to metrics.jsonl and TensorBoard (tf4ctr_dist/studies/analyses.py):
    # buckets = difficulty buckets on valid, histograms = prediction histograms on train and valid,
    # fusion = gate / fusion values; off by default because they cost more: test_buckets = the test
    # split evaluated every epoch too (its metrics and buckets: the paper's Fig 10), grad_norms =
    # ||dL/dz_s||, ||dL/dz_c|| of every step of the first epoch; telemetry (on, cheap; TF loss
    # only) = per window of training steps the share of samples each branch finds easy and the
    # mean weight of each TF term.
    analyses: list[str] = field(default_factory=lambda: ["buckets", "histograms", "fusion", "telemetry"])
    # TensorBoard event files under OUT/tb/ (rank 0).
    tensorboard: bool = True


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
    verbose: bool = False  # print the whole sharding plan and library warnings

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


def parse_mapping(text: str, where: str, yaml_syntax: Optional[bool] = None) -> dict:
    """The mapping in a YAML or JSON file's ``text`` (``yaml_syntax`` None: YAML when ``where``
    ends in .yaml/.yml); a syntax error, or a document that is not a mapping, is a ConfigError
    naming ``where`` and the line. YAML is read with the safe loader: tags such as
    !!python/object are refused, never run."""
    if yaml_syntax if yaml_syntax is not None else where.endswith((".yaml", ".yml")):
        import yaml

        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"{where}: not valid YAML{at}: {problem}") from None
    else:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping (key: value lines) at the top level, got a {type(raw).__name__}")
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML/JSON config file (or the defaults) and apply overrides."""
    cfg = RunConfig()
    if path is not None:
        raw = parse_mapping(Path(path).read_text(), str(path))
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
    """Section name -> dataclass, nested ones dotted (model.encoders)."""
    hints = typing.get_type_hints(RunConfig)
    sections = {k: v for k, v in hints.items() if dataclasses.is_dataclass(v)}
    for name, cls in list(sections.items()):
        for sub, tp in typing.get_type_hints(cls).items():
            if dataclasses.is_dataclass(tp):
                sections[f"{name}.{sub}"] = tp
    return sections


def _all_keys() -> dict[str, str]:
    """Every settable key, short and dotted -> the dotted form."""
    keys: dict[str, str] = {}
    for section, cls in _section_classes().items():
        for f in dataclasses.fields(cls):
            keys[f"{section}.{f.name}"] = f"{section}.{f.name}"
            keys.setdefault(f.name, f"{section}.{f.name}")
    for f in dataclasses.fields(RunConfig):
        if f.name not in _section_classes():
            keys[f.name] = f.name
    return keys


def _unknown_key(key: str, section: Optional[str] = None) -> ConfigError:
    """'unknown config key' naming the closest valid key and the section's keys."""
    keys = _all_keys()
    guess = difflib.get_close_matches(key, list(keys), n=1, cutoff=0.6)
    if not guess and "." in key:
        guess = difflib.get_close_matches(key.rsplit(".", 1)[1], list(keys), n=1, cutoff=0.6)
    hint = f"; did you mean {guess[0]!r}?" if guess else ""
    section = section or (keys[guess[0]].rsplit(".", 1)[0] if guess and "." in keys[guess[0]] else None)
    sections = _section_classes()
    if section in sections:
        names = sorted(f.name for f in dataclasses.fields(sections[section]))
        listing = f"{section} has: {', '.join(names)}"
    else:
        listing = f"sections: {', '.join(sections)}; top-level keys: out, name, verbose"
    return ConfigError(f"unknown config key {key!r}{hint}{' ' if hint else '; '}{listing}")


def _resolve_key(key: str) -> list[str]:
    sections = _section_classes()
    parts = key.split(".")
    owner = ".".join(parts[:-1])
    if len(parts) >= 2 and owner in sections:
        names = {f.name for f in dataclasses.fields(sections[owner])}
        if parts[-1] not in names:
            raise _unknown_key(key, owner)
        return parts
    nested = [s for s in sections if s.endswith("." + owner)]
    if len(parts) >= 2 and len(nested) == 1:  # a nested section by its own name: encoders.cross_layers
        return _resolve_key(f"{nested[0]}.{parts[-1]}")
    if len(parts) == 1:
        if parts[0] in {f.name for f in dataclasses.fields(RunConfig)} and parts[0] not in sections:
            return parts
        owners = [s for s, c in sections.items() if parts[0] in {f.name for f in dataclasses.fields(c)}]
        if len(owners) == 1:
            return [*owners[0].split("."), parts[0]]
        if len(owners) > 1:
            raise ConfigError(f"config key {key!r} is ambiguous; use one of {[o + '.' + key for o in owners]}")
    raise _unknown_key(key)


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        guesses = [difflib.get_close_matches(u, sorted(names), n=1, cutoff=0.6) for u in unknown]
        hint = "".join(f"; did you mean {(where + '.' if where else '') + g[0]!r} for {u!r}?"
                       for u, g in zip(unknown, guesses) if g)
        raise ConfigError(
            f"unknown config key(s) {', '.join(repr((where + '.' if where else '') + u) for u in unknown)}{hint}; "
            f"{where or 'top level'} accepts: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in raw.items():
        key = f"{where}.{name}" if where else name
        kwargs[name] = _coerce(hints[name], value, key)
    built = cls(**kwargs)
    for problem in _range_problems(built, where):
        raise ConfigError(problem)
    return built


# Validation metrics whose sum early stopping maximises.
MONITORS = ("AUC", "gAUC")
# train.analyses (tf4ctr_dist/studies/analyses.py has the same tuple; config imports no torch).
ANALYSES = ("buckets", "histograms", "fusion", "test_buckets", "grad_norms", "telemetry")


def _positive(v: Any) -> bool:
    return v > 0


def _non_negative(v: Any) -> bool:
    return v >= 0


def _probability(v: Any) -> bool:
    return 0.0 <= v < 1.0


# section -> key -> (check, what is expected)
_RANGES: dict[str, dict[str, tuple[Any, str]]] = {
    "data": {"shuffle_buffer_rows": (_positive, "a positive number of rows"),
             "storage_retry_seconds": (_non_negative, "a window in seconds >= 0 (0: no retries)")},
    "model": {
        "embedding_dim": (_positive, "a positive integer"),
        "easy_hidden_units": (lambda v: all(u > 0 for u in v), "a list of positive layer sizes"),
        "hard_hidden_units": (lambda v: all(u > 0 for u in v), "a list of positive layer sizes"),
        "net_dropout": (_probability, "a dropout rate in [0, 1)"),
    },
    "loss": {
        "alpha": (lambda v: 0.0 <= v <= 1.0, "a weight in [0, 1]"),
        "c": (_positive, "a positive threshold (the spec's c, e.g. 0.7)"),
        "gamma": (_non_negative, "a focusing exponent >= 0"),
        "m": (lambda v: v is None or v > 0, "a positive margin, or null for 2 - c"),
        "focal_gamma": (_non_negative, "a focusing exponent >= 0"),
    },
    "train": {
        "batch_size": (_positive, "a positive global batch size"),
        "eval_batch_size": (_positive, "a positive global batch size"),
        "epochs": (_non_negative, "a number of epochs >= 0 (0: evaluate only)"),
        "lr": (_positive, "a positive learning rate"),
        "clip_grad_norm": (_non_negative, "a norm >= 0 (0: no clipping)"),
        "emb_reg": (_non_negative, "a penalty >= 0"),
        "embedding_lr": (lambda v: v is None or v > 0, "a positive learning rate, or null for lr"),
        "monitor": (lambda v: len(v) > 0 and set(v) <= set(MONITORS), f"a non-empty list of {', '.join(MONITORS)}"),
        "patience": (_positive, "a positive number of epochs"),
        "lr_decay": (lambda v: 0.0 < v <= 1.0, "a factor in (0, 1]"),
        "min_lr": (_non_negative, "a learning rate >= 0"),
        "seed": (_non_negative, "a seed >= 0"),
        "log_every": (_non_negative, "a number of steps >= 0 (0: no step lines)"),
        "intra_op_threads": (_non_negative, "a number of threads >= 0 (0: cores / workers)"),
        "analyses": (lambda v: set(v) <= set(ANALYSES), f"a list of {', '.join(ANALYSES)}"),
    },
    "cluster": {
        "workers": (_positive, "a positive number of workers"),
        "cpus_per_worker": (_positive, "a positive number of CPUs"),
        "max_failures": (lambda v: v >= -1, "a number of restarts >= 0, or -1 for unlimited"),
    },
    "checkpoint": {
        "every_steps": (_non_negative, "a number of steps >= 0 (0: epoch ends only)"),
        "keep": (_positive, "a positive number of checkpoints"),
    },
}


def _range_problems(obj: Any, where: str) -> list[str]:
    """Values of the right type but outside what they can mean; checked on the driver, so a bad
    value fails in a second instead of inside a worker minutes later."""
    checks = _RANGES.get(where, {})
    problems = [f"{where}.{name}={getattr(obj, name)!r}: expected {what}"
                for name, (ok, what) in checks.items() if hasattr(obj, name) and not ok(getattr(obj, name))]
    if isinstance(obj, RunConfig):
        m = obj.model
        if m.ssem == "ser" and m.embedding_dim % 2:
            problems.append(f"model.embedding_dim={m.embedding_dim}: ssem=ser needs an even dim (the easy tables have d/2)")
        from tf4ctr_dist.data.storage import credentials_message, has_credentials

        for key, url in (("data.url", obj.data.url), ("out", obj.out), ("checkpoint.root", obj.checkpoint.root),
                         ("checkpoint.warm_start", obj.checkpoint.warm_start)):
            if has_credentials(url):
                problems.append(credentials_message(url, key))
        splits = [obj.data.train_split, obj.data.valid_split, obj.data.test_split]
        if len(set(splits)) != 3 or not all(splits):
            problems.append(f"data: train/valid/test splits must be three different names, got {splits}")
    return problems


def _coerce(tp: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):  # e.g. model.encoders=EncoderConfig(...) from a dict of overrides
            value = dataclasses.asdict(value)
        return _build(tp, value, key)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if origin is Literal:
        if isinstance(value, bool) and "on" in args and "off" in args:
            value = "on" if value else "off"  # YAML 1.1 reads a bare on/off as a boolean
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
