"""Describing a cluster you may not have: device types, ranks per node, bandwidths, and the
table sizes to plan for (from a manifest, a spec file, vocabulary sizes or a Criteo-like skew)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

from torchrec.distributed.planner import Topology


KiB, MiB, GiB = 2**10, 2**20, 2**30
GB = 1e9  # bandwidths are in decimal GB/s, as vendors quote them
RESERVED_FRACTION = 0.15  # TorchRec's default HeuristicalStorageReservation percentage
ID_BYTES = 8  # int64 ids
EMB_BYTES = 4  # fp32 pooled embeddings and their gradients
WEIGHT_BYTES = 4  # fp32 table weights

# ---- cluster description ----------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceType:
    """One accelerator kind as a node of a typical cloud instance sees it."""

    name: str
    compute_device: str  # TorchRec compute device: "cuda" or "cpu"
    hbm_bytes: int  # per device (what nvidia-smi reports); 0 for CPU workers
    ddr_per_node_bytes: int  # host memory of one node
    intra_node_bw: float  # bytes/s per rank, one direction (NVLink / shared memory)
    inter_node_bw: float  # bytes/s per rank, one direction (node NIC bandwidth / ranks per node)
    ranks_per_node: int
    note: str


DEVICE_TYPES: dict[str, DeviceType] = {
    d.name: d
    for d in (
        DeviceType("h100-80gb", "cuda", 81559 * MiB, 2048 * GiB, 450 * GB, 50 * GB, 8,
                   "H100 SXM 80 GB; NVLink 4 (900 GB/s both ways); 3200 Gb/s EFA per node (AWS p5.48xlarge)"),
        DeviceType("h200-141gb", "cuda", 143771 * MiB, 2048 * GiB, 450 * GB, 50 * GB, 8,
                   "H200 SXM 141 GB; NVLink 4; 3200 Gb/s EFA per node (AWS p5en.48xlarge)"),
        DeviceType("a100-80gb", "cuda", 81920 * MiB, 1152 * GiB, 300 * GB, 6.25 * GB, 8,
                   "A100 SXM 80 GB; NVLink 3 (600 GB/s both ways); 400 Gb/s EFA per node (AWS p4de.24xlarge)"),
        DeviceType("cpu", "cpu", 0, 128 * GiB, 10 * GB, 3.125 * GB, 1,
                   "CPU workers over gloo; 128 GiB host memory and 25 Gb/s network per node"),
    )
}


@dataclass(frozen=True)
class ClusterSpec:
    device: DeviceType
    world_size: int
    ranks_per_node: int
    hbm_per_rank: int
    ddr_per_rank: int
    intra_node_bw: float
    inter_node_bw: float
    node_size: int = 0  # ranks a whole node has (ranks_per_node is smaller for a job under one node)

    @classmethod
    def of(
        cls,
        device_type: str,
        world_size: int,
        ranks_per_node: Optional[int] = None,
        *,
        hbm_gib: Optional[float] = None,
        ddr_gib_per_node: Optional[float] = None,
        intra_node_gbps: Optional[float] = None,
        inter_node_gbps: Optional[float] = None,
    ) -> "ClusterSpec":
        """``device_type`` from DEVICE_TYPES; overrides in GiB and GB/s. On CPU, the ranks of one
        node default to all workers (one host)."""
        if device_type not in DEVICE_TYPES:
            raise ValueError(f"unknown device type {device_type!r}; known: {', '.join(DEVICE_TYPES)}")
        dev = DEVICE_TYPES[device_type]
        if world_size < 1:
            raise ValueError(f"need at least one rank, got {world_size}")
        node_size = ranks_per_node or (world_size if dev.compute_device == "cpu" else dev.ranks_per_node)
        per_node = min(node_size, world_size)  # a job smaller than a node uses part of one
        if world_size % per_node:
            raise ValueError(
                f"{world_size} ranks do not fill whole nodes of {per_node}; "
                "give a multiple of the ranks per node (--gpus-per-node)"
            )
        hbm = int(hbm_gib * GiB) if hbm_gib is not None else dev.hbm_bytes
        ddr_node = int(ddr_gib_per_node * GiB) if ddr_gib_per_node is not None else dev.ddr_per_node_bytes
        return cls(
            device=dev,
            world_size=world_size,
            ranks_per_node=per_node,
            hbm_per_rank=hbm if dev.compute_device != "cpu" else 0,
            ddr_per_rank=ddr_node // node_size,
            intra_node_bw=intra_node_gbps * GB if intra_node_gbps else dev.intra_node_bw,
            inter_node_bw=inter_node_gbps * GB if inter_node_gbps else dev.inter_node_bw,
            node_size=node_size,
        )

    @property
    def nodes(self) -> int:
        return self.world_size // self.ranks_per_node

    @property
    def on_gpu(self) -> bool:
        return self.device.compute_device != "cpu"

    def topology(self) -> Topology:
        return Topology(
            world_size=self.world_size,
            compute_device=self.device.compute_device,
            hbm_cap=self.hbm_per_rank if self.on_gpu else None,
            ddr_cap=self.ddr_per_rank,
            local_world_size=self.ranks_per_node,
            intra_host_bw=self.intra_node_bw / 1000,  # TorchRec: bytes per ms
            inter_host_bw=self.inter_node_bw / 1000,
        )

    def describe(self) -> str:
        mem = f"HBM {self.hbm_per_rank / GiB:.1f} GiB/rank, " if self.on_gpu else ""
        return (
            f"{self.world_size} x {self.device.name} ({self.nodes} node(s) x {self.ranks_per_node}); "
            f"{mem}DDR {self.ddr_per_rank / GiB:.0f} GiB/rank; per rank {self.intra_node_bw / GB:g} GB/s "
            f"intra-node, {self.inter_node_bw / GB:g} GB/s inter-node  [{self.device.note}]"
        )


# ---- field (vocabulary) inputs ----------------------------------------------------------------


@dataclass(frozen=True)
class FieldInput:
    name: str
    vocab_size: int  # embedding rows incl. PAD and OOV (1 for a numeric field)
    pooling_factor: float = 1.0  # ids per sample (1 for categorical fields)
    numeric: bool = False  # embedded as value x vector: one row, weighted lookups


def fields_from_vocab_sizes(sizes: Iterable[int], prefix: str = "C") -> list[FieldInput]:
    out = [FieldInput(f"{prefix}{i}", int(v)) for i, v in enumerate(sizes, 1)]
    _check_fields(out)
    return out


def fields_from_manifest(url: str) -> list[FieldInput]:
    """Vocabulary sizes of a prepared dataset; a sequence field counts max_len ids per sample
    (an upper bound: the manifest does not record mean lengths)."""
    from tf4ctr_dist.data.manifest import load_manifest

    manifest = load_manifest(url)
    return [
        FieldInput(f.name, f.vocab_size, float(f.max_len) if f.kind == "sequence" and f.max_len else 1.0,
                   f.kind == "numeric")
        for f in manifest.fields
    ]


def fields_from_spec(path: str | Path) -> list[FieldInput]:
    """YAML/JSON spec: ``fields: [{name, vocab_size, pooling_factor?}, ...]``, ``fields: {name:
    vocab_size}`` or ``vocab_sizes: [...]``."""
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:  # JSON is YAML too
        raise ValueError(f"{path}: not valid YAML or JSON ({str(e).splitlines()[0]})") from None
    if isinstance(raw, list):
        raw = {"fields": raw}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping with 'fields' or 'vocab_sizes'")
    if "vocab_sizes" in raw:
        return fields_from_vocab_sizes(raw["vocab_sizes"])
    items = raw.get("fields")
    if isinstance(items, dict):
        out = [FieldInput(str(k), int(v)) for k, v in items.items()]
    elif isinstance(items, list):
        out = []
        for i, f in enumerate(items):
            if not isinstance(f, dict) or "vocab_size" not in f:
                raise ValueError(f"{path}: fields[{i}] needs a vocab_size")
            out.append(FieldInput(str(f.get("name", f"C{i + 1}")), int(f["vocab_size"]),
                                  float(f.get("pooling_factor", 1.0))))
    else:
        raise ValueError(f"{path}: expected 'fields' (list or mapping) or 'vocab_sizes'")
    _check_fields(out)
    return out


def criteo_like_fields(total_rows: int, fields: int = 26, decay: float = 0.5) -> list[FieldInput]:
    """Split ``total_rows`` embedding rows over ``fields`` categorical fields with a Criteo-like
    skew: field i gets a share proportional to decay**i (decay 0.5: 50%, 25%, 12.5%, ... so the
    four largest fields hold ~94% of the rows, as in Criteo where a few id fields dominate), and at
    least 3 rows (PAD, one id, OOV). The largest field absorbs rounding, so the sizes sum exactly
    to ``total_rows``."""
    if fields < 1:
        raise ValueError(f"fields must be >= 1, got {fields}")
    if not 0 < decay <= 1:
        raise ValueError(f"decay must be in (0, 1], got {decay}")
    if total_rows < 3 * fields:
        raise ValueError(f"total rows {total_rows:,} < 3 per field x {fields} fields")
    weights = [decay**i for i in range(fields)]
    norm = sum(weights)
    sizes = [max(3, int(total_rows * w / norm)) for w in weights]
    sizes[0] += total_rows - sum(sizes)
    return fields_from_vocab_sizes(sizes)


def _check_fields(fields: Sequence[FieldInput]) -> None:
    if not fields:
        raise ValueError("no fields given")
    for f in fields:
        if f.numeric and f.vocab_size != 1:
            raise ValueError(f"field {f.name}: a numeric field has one row (its vector), got vocab_size {f.vocab_size}")
        if not f.numeric and f.vocab_size < 2:
            raise ValueError(f"field {f.name}: vocab_size should be >= 2 (PAD + OOV), got {f.vocab_size}")
        if f.pooling_factor <= 0:
            raise ValueError(f"field {f.name}: pooling_factor should be > 0, got {f.pooling_factor}")
    names = [f.name for f in fields]
    if len(set(names)) != len(names):
        raise ValueError("field names are not unique")


def _reservation_words(cluster: ClusterSpec) -> str:
    if cluster.on_gpu:
        return f"reserved by TorchRec: {RESERVED_FRACTION:.0%} margin + dense model x6 + input buffers"
    return "reserved by TorchRec for the dense model (x6)"
