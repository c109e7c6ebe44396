"""Model building blocks (pure torch/torchrec: never imports ray or tf4ctr_dist.distributed)."""

from tf4ctr_dist.modules.embedding import field_tables, init_embedding_rows
from tf4ctr_dist.modules.fusion import (
    ConcatFusion,
    MoEFusion,
    SumFusion,
    VariationalFusion,
    WeightedSumFusion,
)
from tf4ctr_dist.modules.init import init_linear, reset_dense
from tf4ctr_dist.modules.mlp import MLPEncoder
from tf4ctr_dist.modules.ssem import GateSSEM, MoESSEM, ShareSSEM
from tf4ctr_dist.modules.tf4ctr import TF4CTR

__all__ = [
    "ConcatFusion",
    "GateSSEM",
    "MLPEncoder",
    "MoEFusion",
    "MoESSEM",
    "ShareSSEM",
    "SumFusion",
    "TF4CTR",
    "VariationalFusion",
    "WeightedSumFusion",
    "field_tables",
    "init_embedding_rows",
    "init_linear",
    "reset_dense",
]
