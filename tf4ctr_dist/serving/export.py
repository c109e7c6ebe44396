"""A finished run -> one serving artifact, and the artifact -> a single-device Scorer.

Sources: the run's config.json (model settings, dataset URL), the dataset's manifest (fields,
spec) and vocab/<field>.parquet files (checked against the sha256 the manifest recorded), and
the run's best committed checkpoint (tables, dense weights, BatchNorm statistics).

Tables come out of the DCP checkpoint in blocks of rows (``block_bytes``, default 256 MiB; see
dcp_rows): each block is planned against however the run sharded the table (table-wise,
column-wise, row-wise: the saved chunks carry their offsets), and only the bytes of its rows are
read from the shard files. The artifact writer takes the blocks one after the other (the
safetensors header is fixed first from the checkpoint's shapes; see artifact.py), so an export
holds about two blocks of a table in memory, whatever its size (plus the vocabularies, held
whole: token lists, an order of magnitude smaller than the tables they index); a table larger
than one host's memory exports the same way as a small one. The block size changes nothing in
the file: every block size gives the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import pyarrow.parquet as pq
import torch

from tf4ctr_dist.config import ConfigError, RunConfig
from tf4ctr_dist.data.errors import DataError
from tf4ctr_dist.data.manifest import MANIFEST_NAME, Manifest, load_manifest
from tf4ctr_dist.data.storage import display_url, resolve
from tf4ctr_dist.serving import artifact
from tf4ctr_dist.serving.dcp_rows import DEFAULT_BLOCK_BYTES, OnRead, RowRangeReader, iter_row_blocks
from tf4ctr_dist.serving.features import build_mappers
from tf4ctr_dist.serving.scorer import Scorer

logger = logging.getLogger("tf4ctr_dist")
FORMAT = "tf4ctr-serving"
VERSION = "1"
# The read size of load and from_run: the model they fill is already in memory, so a block is all
# that reading adds on top; smaller than export's default, which also bounds the file writer's buffering.
SCORER_BLOCK_BYTES = 64 << 20
CKPT_PREFIX = "model.model."  # app_state "model" -> DMP(TF4CTRTrain) -> .model (TF4CTR)


def _read_text(url: str) -> bytes:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{url}: not found (is this a finished run folder?)") from None


def run_config(run: str) -> RunConfig:
    url = f"{run.rstrip('/')}/config.json"
    try:
        return RunConfig.from_dict(json.loads(_read_text(url)))
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{url}: not a run configuration ({e})") from None


def build_model(manifest: Manifest, cfg: RunConfig, precision: Optional[str] = None, device: str = "cpu"):
    """The TF4CTR of the run, unsharded, with the eager dense ops (no compiled kernels), on
    ``device`` ("meta": every tensor's name, dtype and shape, nothing allocated).
    ``precision``: model.inference_precision for scoring (default: the run's)."""
    from tf4ctr_dist.model import model_for_dataset
    from tf4ctr_dist.modules.mlp import cpu_has_fast_bf16

    if precision is not None:
        cfg = RunConfig.from_dict({**cfg.to_dict(), "model": {**cfg.to_dict()["model"], "inference_precision": precision}})
    scoring = cfg.model.inference_precision if cfg.model.inference_precision != "auto" else cfg.model.dense_precision
    if scoring == "bf16" and device != "meta" and not cpu_has_fast_bf16():  # a meta model never scores
        logger.warning("scoring in bf16 on a CPU without bf16 dot products (AVX512-BF16 / AMX): the same "
                       "function as on one with them, but several times slower than fp32 here")
    return model_for_dataset(manifest, cfg.model, device=device)


def read_vocabularies(data_url: str, manifest: Manifest, storage_options: Optional[dict] = None) -> dict[str, list[str]]:
    """Tokens in id order of every counted field, from the dataset's vocab/<field>.parquet."""
    loc = resolve(data_url, storage_options)
    described = manifest.spec.get("vocab") or {}
    out: dict[str, list[str]] = {}
    for f in manifest.fields:
        if f.vocab_mode != "counted":
            continue
        # spec.vocab's shape was checked when the manifest was parsed (data.manifest)
        file = (described.get(f.name) or {}).get("file")
        if not isinstance(file, dict) or "path" not in file:
            raise DataError(f"{loc.url_of(MANIFEST_NAME)}: spec.vocab.{f.name} names no vocabulary file; "
                            "scoring raw values needs the dataset's saved vocabularies")
        url = loc.url_of(file["path"])
        try:
            data = loc.retry(lambda: loc.fs.cat_file(loc.path(file["path"])), url)
        except FileNotFoundError:
            raise DataError(f"{url}: vocabulary file missing") from None
        if file.get("sha256") and hashlib.sha256(data).hexdigest() != file["sha256"]:
            raise DataError(f"{url}: does not match the sha256 in the manifest; refusing to use it")
        import io

        table = pq.read_table(io.BytesIO(data), columns=["token", "id"])
        ids = table.column("id").to_numpy()
        if len(ids) + 2 != f.vocab_size or (ids != range(1, len(ids) + 1)).any():
            raise DataError(f"{url}: expected ids 1..{f.vocab_size - 2} in order, got {len(ids)} rows")
        out[f.name] = table.column("token").to_pylist()
    return out


def _best_entry(run: str, cfg: RunConfig):
    from tf4ctr_dist.distributed.checkpoint import CheckpointStore, checkpoint_root

    root = checkpoint_root(run, None)
    store = CheckpointStore(root, 0, 1)
    entry = store.best() or store.latest()
    if entry is None and cfg.checkpoint.root and cfg.checkpoint.root.rstrip("/") != root:
        store = CheckpointStore(checkpoint_root(run, cfg.checkpoint.root), 0, 1)
        entry = store.best() or store.latest()
    if entry is None:
        raise ConfigError(f"{run}: no committed checkpoint under {store.url} (trained with checkpoint.enabled=false?); "
                          "export and predict read the run's best checkpoint")
    return store, entry


def checkpoint_tensors(run: str, cfg: RunConfig, model: torch.nn.Module, block_bytes: Optional[int] = None,
                       on_read: Optional[OnRead] = None) -> tuple[dict, Iterator[tuple[str, torch.Tensor]]]:
    """(specs, blocks): every tensor of ``model.state_dict()`` from the run's best checkpoint, as
    (key, rows) blocks in ``specs`` order: consecutive blocks of one key are its rows in order,
    each at most ``block_bytes`` (a row is never cut; None: each tensor whole). specs: key ->
    (dtype, shape). on_read(key, nbytes): each read from the checkpoint's files (dcp_rows)."""
    store, entry = _best_entry(run, cfg)
    saved = store.tensor_shapes(entry)
    state = model.state_dict()
    specs, missing = {}, []
    for key, value in state.items():
        shape = saved.get(CKPT_PREFIX + key)
        if shape is None or tuple(shape) != tuple(value.shape):
            missing.append(f"{key}: checkpoint {shape} vs model {tuple(value.shape)}")
        specs[key] = (value.dtype, tuple(value.shape))
    if missing:
        raise ConfigError(f"{store.url}/{entry.name} does not fit the run's model ({len(missing)} tensors, e.g. "
                          f"{'; '.join(missing[:3])})")
    if block_bytes is not None and block_bytes < 1:
        raise ConfigError(f"export block size must be >= 1 byte, got {block_bytes}")

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        reader = RowRangeReader(store.storage_reader(entry), on_read)
        for key, (dtype, shape) in specs.items():
            for block in iter_row_blocks(reader, CKPT_PREFIX + key, shape, dtype, block_bytes):
                yield key, block

    return specs, tensors()


def export_run(run: str, out: str, storage_options: Optional[dict] = None,
               block_bytes: int = DEFAULT_BLOCK_BYTES) -> dict[str, Any]:
    """Write the artifact of ``run`` to the local file ``out``, tables read and written in row
    blocks of at most ``block_bytes`` (see the module docstring); returns a summary."""
    cfg = run_config(run)
    manifest = load_manifest(cfg.data.url, storage_options, cfg.data.storage_retry_seconds)
    vocabs = read_vocabularies(cfg.data.url, manifest, storage_options)
    build_mappers([vars(f) for f in manifest.fields], manifest.spec, vocabs)  # refuse what load() would
    # On meta: only the names, dtypes and shapes are needed, and a model on CPU would allocate
    # (and initialise) every table whole, which is what the blocks are there to avoid.
    model = build_model(manifest, cfg, device="meta")
    model_specs, model_tensors = checkpoint_tensors(run, cfg, model, block_bytes)
    _, entry = _best_entry(run, cfg)
    size = write_artifact(out, cfg, manifest, vocabs, model_specs, model_tensors,
                          {"run": run, "checkpoint": entry.name, "data": cfg.data.url})
    return {"out": out, "bytes": size, "checkpoint": entry.name, "tensors": len(model_specs),
            "vocabularies": sorted(vocabs)}


def write_artifact(out: str, cfg: RunConfig, manifest: Manifest, vocabs: dict[str, list[str]], model_specs: dict,
                   model_tensors: Iterator[tuple[str, torch.Tensor]], source: dict) -> int:
    """The artifact file: vocabularies first, then the model's tensors as ``model_tensors``
    yields them (state-dict keys, in ``model_specs`` order, whole or in consecutive row blocks);
    returns its size in bytes."""
    encoded = {name: _encode_tokens(tokens) for name, tokens in vocabs.items()}
    specs: dict = {}
    for name, (data, offsets) in encoded.items():
        specs[f"vocab.{name}.bytes"] = (torch.uint8, tuple(data.shape))
        specs[f"vocab.{name}.offsets"] = (torch.int64, tuple(offsets.shape))
    specs.update({f"model.{k}": v for k, v in model_specs.items()})

    def produce() -> Iterator[tuple[str, torch.Tensor]]:
        for name, (data, offsets) in encoded.items():
            yield f"vocab.{name}.bytes", data
            yield f"vocab.{name}.offsets", offsets
        for key, tensor in model_tensors:
            yield f"model.{key}", tensor

    d = manifest.to_dict()
    metadata = {"format": FORMAT, "version": VERSION, "config": json.dumps(cfg.to_dict()),
                "fields": json.dumps(d["fields"]), "spec": json.dumps(d["spec"]), "label": manifest.label,
                "group": json.dumps(manifest.group), "source": json.dumps(source)}
    return artifact.write(out, specs, produce, metadata)


def _encode_tokens(tokens: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """UTF-8 bytes of all tokens (uint8) and their offsets (n + 1,) int64."""
    import numpy as np

    blobs = [t.encode() for t in tokens]
    offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in blobs], out=offsets[1:])
    return torch.frombuffer(bytearray(b"".join(blobs)) or bytearray(1), dtype=torch.uint8)[: offsets[-1]].clone(), \
        torch.from_numpy(offsets)


def _decode_tokens(path: str, name: str, data: torch.Tensor, offsets: torch.Tensor) -> list[str]:
    """The tokens of field ``name`` from its vocab tensors; DataError naming the artifact when the
    offsets do not cut the bytes into UTF-8 tokens (0 first, never decreasing, the bytes' length last)."""
    raw = data.numpy().tobytes()
    o = offsets.tolist()
    if o[:1] != [0] or o[-1] != len(raw) or any(b < a for a, b in zip(o, o[1:])):
        raise DataError(f"{path}: vocab.{name}.offsets should rise, never falling, from 0 to {len(raw)} (the "
                        f"length of vocab.{name}.bytes); got {len(o)} offsets from {o[:1]} to {o[-1:]}")
    try:
        return [raw[a:b].decode() for a, b in zip(o, o[1:])]
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: vocab.{name}.bytes is not UTF-8 text at the offsets given ({e})") from None


def _metadata_json(path: str, meta: dict[str, str], key: str, expected: str, kind: type | tuple[type, ...]) -> Any:
    """meta[key] parsed as JSON, which should be ``expected`` (an instance of ``kind``)."""
    if key not in meta:
        raise DataError(f"{path}: artifact metadata lacks {key!r} (expected {expected}, as `tf4ctr export` writes it)")
    try:
        value = json.loads(meta[key])
    except RecursionError:  # json's parser recurses once per level of nesting
        raise DataError(f"{path}: artifact metadata {key!r} nests arrays or objects too deep; expected {expected}") \
            from None
    except ValueError as e:
        raise DataError(f"{path}: artifact metadata {key!r} is not JSON ({e}); expected {expected}") from None
    if not isinstance(value, kind):
        raise DataError(f"{path}: artifact metadata {key!r} is a JSON {type(value).__name__}; expected {expected}")
    return value


def _expected_tensors(manifest: Manifest, cfg: RunConfig) -> dict[str, tuple[str, Optional[list[int]]]]:
    """name -> (dtype code, shape) of every tensor the artifact of this config and dataset holds
    (shape None: any 1-d length, a vocabulary's bytes). The model's come from the model built
    on the meta device: shapes without storage, so a config that implies a 320 GB table costs
    nothing to describe."""
    from tf4ctr_dist.model import model_for_dataset

    out: dict[str, tuple[str, Optional[list[int]]]] = {}
    for f in manifest.fields:
        if f.vocab_mode == "counted":  # the tokens of ids 1 .. vocab_size - 2: their offsets, one more
            out[f"vocab.{f.name}.bytes"] = ("U8", None)
            out[f"vocab.{f.name}.offsets"] = ("I64", [f.vocab_size - 1])
    with torch.device("meta"):  # the dense layers too (they take the default device)
        model = model_for_dataset(manifest, cfg.model, device="meta")
    for key, value in model.state_dict().items():
        out[f"model.{key}"] = (artifact.DTYPES.get(value.dtype, str(value.dtype)), list(value.shape))
    return out


def _check_tensors(path: str, header: dict, expected: dict[str, tuple[str, Optional[list[int]]]]) -> None:
    """The header's tensor entries against what the artifact's metadata implies, by name: first
    the shapes of the tensors both name (a table's rows are its field's vocab_size), then the
    tensors only one of them names."""
    for name, (dtype, shape) in expected.items():
        got = header.get(name)
        if got is not None and not (got["dtype"] == dtype and (len(got["shape"]) == 1 if shape is None
                                                                else got["shape"] == shape)):
            raise DataError(f"{path}: tensor {name!r} is {got['dtype']} {got['shape']} in the header, but the "
                            f"artifact's config and fields imply {dtype} {shape if shape is not None else '[n]'}; "
                            "refusing to build the model from it")
    lacking = [name for name in expected if name not in header]
    if lacking:
        raise DataError(f"{path}: the header lacks {len(lacking)} tensor(s) its config and fields imply, e.g. "
                        f"{lacking[:3]}")
    extra = [name for name in header if name not in expected]
    if extra:
        raise DataError(f"{path}: the header holds {len(extra)} tensor(s) its config and fields do not imply, e.g. "
                        f"{extra[:3]}")


def check_artifact(path: str) -> tuple[RunConfig, Manifest, dict]:
    """(config, manifest, source) of the artifact at ``path``, its metadata parsed and validated
    and compared with its header, without reading a tensor (what `load` does first; see there).
    `tf4ctr serve` runs it before deploying: a bad artifact is then one error, not each replica's."""
    header, meta, _ = artifact.read_header(path)
    if meta.get("format") != FORMAT:
        raise DataError(f"{path}: not a tf4ctr serving artifact (format {meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise DataError(f"{path}: artifact version {meta.get('version')!r}, this code reads {VERSION}")
    try:
        cfg = RunConfig.from_dict(_metadata_json(path, meta, "config", "the run's configuration, an object", dict))
    except ConfigError as e:
        raise DataError(f"{path}: artifact metadata 'config': {e}") from None
    fields = _metadata_json(path, meta, "fields", "the dataset's fields, a list", list)
    spec = _metadata_json(path, meta, "spec", "the dataset's spec, an object", dict)
    group = _metadata_json(path, meta, "group", "the group column, a string or null", (str, type(None)))
    source = _metadata_json(path, meta, "source", "where the artifact came from, an object", dict)
    # informational, shown by serve and predict: a URL in it never carries a secret onwards
    source = {k: display_url(v) if isinstance(v, str) else v for k, v in source.items()}
    if "label" not in meta:
        raise DataError(f"{path}: artifact metadata lacks 'label' (expected the label column's name)")
    manifest = Manifest.from_dict({"format_version": 1, "label": meta["label"], "group": group,
                                   "fields": fields, "splits": {}, "spec": spec}, source=path)
    _check_tensors(path, header, _expected_tensors(manifest, cfg))
    return cfg, manifest, source


def load(path: str, precision: Optional[str] = None) -> Scorer:
    """The artifact at ``path`` as a single-device Scorer (CPU, eval mode); ``precision``
    overrides the run's model.inference_precision (fp32 / bf16 / auto).

    Untrusted input: the header's entries are checked against the file (artifact.read_header),
    the metadata is parsed and validated (config, fields, spec), and every tensor the metadata
    implies (the model's, built on the meta device; the vocabularies') is compared with the
    header's dtype and shape, all before a tensor is read or a table allocated (check_artifact).
    A tampered or mismatched artifact is thus a DataError naming it and the entry, never an
    allocation the metadata asks for and the file cannot fill."""
    cfg, manifest, source = check_artifact(path)
    counted = [f.name for f in manifest.fields if f.vocab_mode == "counted"]
    tensors, _ = artifact.read(path, [f"vocab.{name}.{part}" for name in counted for part in ("bytes", "offsets")])
    vocabs = {name: _decode_tokens(path, name, tensors[f"vocab.{name}.bytes"], tensors[f"vocab.{name}.offsets"])
              for name in counted}
    try:
        mappers = build_mappers([vars(f) for f in manifest.fields], manifest.spec, vocabs)
    except DataError as e:
        raise DataError(f"{path}: {e}") from None
    model = build_model(manifest, cfg, precision)
    # check_artifact matched the header to every key of the model (dtype, shape)
    blocks = artifact.read_blocks(path, [f"model.{key}" for key in model.state_dict()], SCORER_BLOCK_BYTES)
    _fill(model, ((name.removeprefix("model."), rows) for name, rows in blocks))
    info = {"source": source, "path": path, "raw_columns": _raw_columns(manifest.spec)}
    return Scorer(model, mappers, manifest.label, manifest.group, info)


def _fill(model: torch.nn.Module, blocks: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Copy (key, rows) blocks (consecutive blocks of a key are its rows in order) into
    ``model.state_dict()`` in place: the model is in memory once plus a block, where
    load_state_dict of whole tensors would hold it twice. Every key must be filled exactly."""
    state, filled = model.state_dict(), {}
    with torch.no_grad():
        for key, rows in blocks:
            target, first = state[key], filled.get(key, 0)
            (target[first:first + len(rows)] if target.dim() else target).copy_(rows)
            filled[key] = first + (len(rows) if target.dim() else 1)
    short = [key for key, t in state.items() if filled.get(key, 0) != (len(t) if t.dim() else 1)]
    if short:
        raise ValueError(f"{len(short)} model tensor(s) not filled exactly, e.g. {short[:3]}")


def from_run(run: str, storage_options: Optional[dict] = None, precision: Optional[str] = None,
             block_bytes: int = SCORER_BLOCK_BYTES) -> Scorer:
    """The run's best weights as a Scorer, in memory (what export then load gives, without the file);
    ``precision`` as for `load`; the checkpoint is read in row blocks of at most ``block_bytes``."""
    cfg = run_config(run)
    manifest = load_manifest(cfg.data.url, storage_options, cfg.data.storage_retry_seconds)
    vocabs = read_vocabularies(cfg.data.url, manifest, storage_options) if _all_vocab_files(manifest) else {}
    # Every key of the model checked against the checkpoint on meta first: a manifest that does
    # not fit it (edited, or the wrong dataset) is refused before a table is allocated.
    _, blocks = checkpoint_tensors(run, cfg, build_model(manifest, cfg, precision, device="meta"), block_bytes)
    model = build_model(manifest, cfg, precision)
    _fill(model, blocks)
    store, entry = _best_entry(run, cfg)
    fields = [vars(f) for f in manifest.fields]
    mappers = build_mappers(fields, manifest.spec, vocabs) if vocabs or not any(
        f.vocab_mode == "counted" for f in manifest.fields) else []
    return Scorer(model, mappers or _id_only(manifest), manifest.label, manifest.group,
                  {"source": {"run": run, "checkpoint": entry.name, "data": cfg.data.url},
                   "raw_columns": _raw_columns(manifest.spec)})


def _raw_columns(spec: dict) -> Optional[list[str]]:
    """spec.raw_columns (the raw input's column order, recorded by prepare), if a list of names."""
    names = spec.get("raw_columns")
    return [str(n) for n in names] if isinstance(names, list) and names else None


@dataclass(frozen=True)
class ModelInfo:
    """What predict needs to plan its work, without loading a model's weights."""

    feature_names: list[str]
    label: str
    group: Optional[str]
    raw_columns: Optional[list[str]]


def describe(run: Optional[str] = None, model: Optional[str] = None,
             storage_options: Optional[dict] = None) -> ModelInfo:
    """The fields, label, group and raw column order of a run (its dataset's manifest) or of an
    artifact (its header only, checked whole: `check_artifact`); exactly one of ``run`` / ``model``."""
    if (run is None) == (model is None):
        raise ValueError("describe: give exactly one of run, model")
    if model is not None:
        if not os.path.isfile(model):
            raise FileNotFoundError(f"{model}: no such artifact file")
        _, manifest, _ = check_artifact(model)  # the whole header and metadata, no tensor read
    else:
        cfg = run_config(run)
        manifest = load_manifest(cfg.data.url, storage_options, cfg.data.storage_retry_seconds)
    return ModelInfo(manifest.field_names, manifest.label, manifest.group, _raw_columns(manifest.spec))


def _all_vocab_files(manifest: Manifest) -> bool:
    described = manifest.spec.get("vocab") or {}
    return all(isinstance((described.get(f.name) or {}).get("file"), dict)
               for f in manifest.fields if f.vocab_mode == "counted")


def _id_only(manifest: Manifest):
    """Mappers that only name the fields (a dataset without vocab files, e.g. synthetic):
    such a Scorer scores prepared ids (forward) but not raw values (score)."""
    return [_NoRaw(f.name, f.kind, f.vocab_mode, f.vocab_size) for f in manifest.fields]


class _NoRaw:
    def __init__(self, name: str, kind: str, mode: str, size: int) -> None:
        self.name, self.kind, self.vocab_mode, self.vocab_size = name, kind, mode, size

    def lookups(self, column, weighted: bool):
        return self.ids(column)

    def ids(self, column):
        raise DataError(f"field {self.name!r}: the run's dataset saved no vocabulary for it, so raw values "
                        "cannot be mapped; score prepared ids instead")
