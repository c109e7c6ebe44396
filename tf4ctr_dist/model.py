"""Builders that assemble TF4CTR from its parts, and the train wrapper that owns the loss.

Every class that runs is named here: the builder reads the typed config and passes concrete
modules into constructors (no registries).
"""

from __future__ import annotations

from typing import Collection, Optional, Sequence

import torch
from torch import nn
from torchrec import EmbeddingBagCollection
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from tf4ctr_dist.config import LossConfig, ModelConfig
from tf4ctr_dist.data.batch import Batch
from tf4ctr_dist.losses import RCELoss, bce_loss, focal_loss, twin_focus_loss
from tf4ctr_dist.modules.embedding import field_tables
from tf4ctr_dist.modules.fusion import (
    ConcatFusion,
    MoEFusion,
    SumFusion,
    VariationalFusion,
    WeightedSumFusion,
)
from tf4ctr_dist.modules.mlp import MLPEncoder
from tf4ctr_dist.modules.ssem import GateSSEM, MoESSEM, ShareSSEM
from tf4ctr_dist.modules.tf4ctr import TF4CTR

EASY_PREFIX = "easy"
HARD_PREFIX = "hard"


def embedding_tables(
    fields: Sequence[tuple[str, int]], cfg: ModelConfig, mean_pooled: Collection[str] = ()
) -> list[EmbeddingBagConfig]:
    """All tables the model will hold: the easy set, plus the hard set with SER.
    ``mean_pooled`` names the sequence fields (see ``field_tables``)."""
    d = cfg.embedding_dim
    if cfg.ssem == "ser":
        if d % 2:
            raise ValueError(f"ssem=ser needs an even embedding_dim (easy tables use d/2), got {d}")
        return field_tables(EASY_PREFIX, fields, d // 2, mean_pooled) + field_tables(HARD_PREFIX, fields, d, mean_pooled)
    return field_tables(EASY_PREFIX, fields, d, mean_pooled)


def build_fusion(kind: str, simple_dim: int, complex_dim: int) -> nn.Module:
    if kind == "sum":
        return SumFusion()
    if kind == "wsf":
        return WeightedSumFusion()
    if kind == "vf":
        return VariationalFusion(simple_dim, complex_dim)
    if kind == "cf":
        return ConcatFusion(simple_dim, complex_dim)
    if kind == "moef":
        return MoEFusion(simple_dim, complex_dim)
    raise ValueError(f"unknown dfm {kind!r}")


def build_ssem(kind: str, in_dim: int, dropout: float) -> nn.Module:
    if kind in ("share", "ser"):
        return ShareSSEM()
    if kind == "gm":
        return GateSSEM(in_dim, dropout)
    if kind == "moe":
        return MoESSEM(in_dim, dropout)
    raise ValueError(f"unknown ssem {kind!r}")


def tf4ctr(
    fields: Sequence[tuple[str, int]],
    cfg: ModelConfig,
    device: torch.device | str = "cpu",
    mean_pooled: Collection[str] = (),
    fused_dense: bool = True,
) -> TF4CTR:
    """TF4CTR for ``fields`` = [(name, vocab_size incl. PAD and OOV), ...] in manifest order.

    Build on ``device="meta"`` for DistributedModelParallel; tables are then materialised by
    the sharder on their owning rank. ``fused_dense=False`` runs the encoders as plain
    nn.Sequential stacks (the pre-fusion path, kept for A/B timing); it needs fp32.
    """
    tables = embedding_tables(fields, cfg, mean_pooled)
    num_fields = len(fields)
    d = cfg.embedding_dim
    easy = [t for t in tables if t.name.startswith(EASY_PREFIX + "_")]
    hard = [t for t in tables if t.name.startswith(HARD_PREFIX + "_")]
    embedding = EmbeddingBagCollection(tables=easy, device=torch.device(device))
    hard_embedding = EmbeddingBagCollection(tables=hard, device=torch.device(device)) if hard else None
    easy_in = num_fields * (d // 2 if hard else d)
    hard_in = num_fields * d
    dtype = {"fp32": None, "bf16": torch.bfloat16}[cfg.dense_precision]
    if dtype is not None and not fused_dense:
        raise ValueError(f"dense_precision={cfg.dense_precision} needs fused_dense=True")
    enc = dict(dropout=cfg.net_dropout, batch_norm=cfg.batch_norm, fused=fused_dense, compute_dtype=dtype)
    simple = MLPEncoder(easy_in, cfg.easy_hidden_units, **enc)
    complex_ = MLPEncoder(hard_in, cfg.hard_hidden_units, **enc)
    model = TF4CTR(
        embedding=embedding,
        hard_embedding=hard_embedding,
        ssem=build_ssem(cfg.ssem, num_fields * d, cfg.net_dropout),
        simple_encoder=simple,
        complex_encoder=complex_,
        fusion=build_fusion(cfg.dfm, simple.out_dim, complex_.out_dim),
    )
    return model


class Objective(nn.Module):
    """Main BCE on the fused logit plus the chosen auxiliary loss on the twin logits.

    loss=tf: BCE(z) + L_TF(z_s, z_c); loss=bce: BCE(z) alone (DualMLP when ssem=share dfm=sum);
    loss=focal / rce: the baseline losses on the fused logit instead of BCE.
    """

    def __init__(self, cfg: LossConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.rce: Optional[RCELoss] = (
            RCELoss(cfg.rce_max_drop_rate, cfg.rce_num_gradual) if cfg.loss == "rce" else None
        )
        self.steps = 0  # training forward passes seen; drives R-CE's growing drop rate

    def forward(
        self, z: torch.Tensor, z_s: torch.Tensor, z_c: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        cfg = self.cfg
        if cfg.loss == "focal":
            return focal_loss(z, labels, valid, gamma=cfg.focal_gamma)
        if self.rce is not None:
            if self.training:
                self.steps += 1
            return self.rce(z, labels, valid, self.steps)
        loss = bce_loss(z, labels, valid)
        if cfg.loss == "tf":
            loss = loss + twin_focus_loss(
                z_s, z_c, labels, valid, alpha=cfg.alpha, c=cfg.c, gamma=cfg.gamma, m=cfg.m
            )
        return loss


class TF4CTRTrain(nn.Module):
    """What DistributedModelParallel wraps: model + objective.

    forward(batch) -> (loss, (loss, probabilities (B,), labels (B,), valid (B,))): the TorchRec
    train pipeline back-propagates the first element and hands the tuple back to the loop.
    """

    def __init__(self, model: TF4CTR, objective: Objective) -> None:
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch: Batch) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        z, z_s, z_c = self.model(batch.sparse_features)
        labels = batch.labels.view(-1, 1)  # (B, 1)
        loss = self.objective(z, z_s, z_c, labels, batch.valid.view(-1, 1))
        probs = torch.sigmoid(z.detach()).view(-1)  # (B,)
        return loss, (loss.detach(), probs, batch.labels, batch.valid)
