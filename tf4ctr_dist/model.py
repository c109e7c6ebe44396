"""Builders that assemble TF4CTR from its parts, and the train wrapper that owns the loss.

Every class that runs is named here: the builder reads the typed config and passes concrete
modules into constructors (no registries).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Collection, Optional, Sequence

import torch
from torch import nn
from torchrec import EmbeddingBagCollection
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from tf4ctr_dist.config import LossConfig, ModelConfig
from tf4ctr_dist.data.batch import Batch
from tf4ctr_dist.losses import TCELoss, bce_loss, focal_loss, reweighted_ce_loss, twin_focus_loss
from tf4ctr_dist.modules.embedding import field_tables
from tf4ctr_dist.modules.encoders import (
    FIRST_ORDER_DIM,
    AFNEncoder,
    AttentionEncoder,
    CINEncoder,
    CrossEncoder,
    CrossV2Encoder,
    FMEncoder,
    LREncoder,
    NoEncoder,
    WithFirstOrder,
)
from tf4ctr_dist.modules.init import init_linear
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

if TYPE_CHECKING:
    from tf4ctr_dist.data.manifest import Manifest
    from tf4ctr_dist.kernels import CpuKernels

EASY_PREFIX = "easy"
HARD_PREFIX = "hard"
LINEAR_PREFIX = "lr"  # the first-order (LR) tables, FIRST_ORDER_DIM wide


def uses_first_order(cfg: ModelConfig) -> bool:
    """Whether the model holds the first-order (LR) table set."""
    return "lr" in (cfg.easy_encoder, cfg.hard_encoder) or "fm" in (cfg.easy_encoder, cfg.hard_encoder) \
        or cfg.encoders.first_order != "none"


def embedding_tables(
    fields: Sequence[tuple[str, int]], cfg: ModelConfig, mean_pooled: Collection[str] = (),
    numeric: Collection[str] = (),
) -> list[EmbeddingBagConfig]:
    """All tables the model will hold: the easy set, plus the hard set with SER, plus the
    first-order set when an encoder needs it.
    ``mean_pooled`` names the sequence fields, ``numeric`` the value x vector fields (see
    ``field_tables``); every table set treats them alike (the LR term of a numeric field is x * w_f)."""
    d = cfg.embedding_dim

    def tables(prefix: str, dim: int) -> list[EmbeddingBagConfig]:
        return field_tables(prefix, fields, dim, mean_pooled, numeric)

    linear = tables(LINEAR_PREFIX, FIRST_ORDER_DIM) if uses_first_order(cfg) else []
    if cfg.ssem == "ser":
        if d % 2:
            raise ValueError(f"ssem=ser needs an even embedding_dim (easy tables use d/2), got {d}")
        return tables(EASY_PREFIX, d // 2) + tables(HARD_PREFIX, d) + linear
    return tables(EASY_PREFIX, d) + linear


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


def build_encoder(
    kind: str, num_fields: int, dim: int, hidden_units: Sequence[int], cfg: ModelConfig, mlp_kwargs: dict
) -> tuple[nn.Module, Optional[nn.Module]]:
    """One branch's encoder for fields of width ``dim`` and its head (None: TF4CTR's default
    Linear(out_dim, 1); nn.Identity for an encoder that emits its logit). ``hidden_units`` and
    ``mlp_kwargs`` are the branch's MLP settings (also AFN's dense layers' dropout/BN/kernels)."""
    opt = cfg.encoders
    in_dim = num_fields * dim
    if kind == "mlp":
        return MLPEncoder(in_dim, hidden_units, **mlp_kwargs), None
    if kind == "none":
        return NoEncoder(), nn.Identity()
    if kind == "lr":
        return LREncoder(bias=False), nn.Identity()
    if kind == "fm":
        return FMEncoder(num_fields, dim), nn.Identity()
    if kind == "cross":
        return CrossEncoder(in_dim, opt.cross_layers), None
    if kind == "crossv2":
        return CrossV2Encoder(in_dim, opt.cross_layers, opt.low_rank, opt.num_experts), None
    if kind == "cin":
        return CINEncoder(num_fields, dim, opt.cin_layer_units), None
    if kind == "attention":
        return AttentionEncoder(
            num_fields, dim, opt.attention_layers, opt.attention_dim, opt.attention_heads, cfg.net_dropout,
            opt.attention_residual, opt.attention_scale, opt.attention_layer_norm), None
    if kind == "afn":
        mlp = MLPEncoder(opt.afn_neurons * dim, opt.afn_hidden_units, **mlp_kwargs)
        return AFNEncoder(num_fields, dim, opt.afn_neurons, mlp), None
    raise ValueError(f"unknown encoder {kind!r}")


def _branch(
    kind: str, first_order: bool, head_bias: bool, num_fields: int, dim: int, hidden_units: Sequence[int],
    cfg: ModelConfig, mlp_kwargs: dict,
) -> tuple[nn.Module, Optional[nn.Module]]:
    """build_encoder plus the branch options: the added LR term and the head's bias."""
    encoder, head = build_encoder(kind, num_fields, dim, hidden_units, cfg, mlp_kwargs)
    if head is None and (first_order or not head_bias):
        head = init_linear(nn.Linear(encoder.out_dim, 1, bias=head_bias))
    if first_order:
        if getattr(encoder, "emits_logit", False):
            raise ValueError(f"encoders.first_order: the {kind!r} encoder has no head to add the LR term to")
        return WithFirstOrder(encoder, head), nn.Identity()
    return encoder, head


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
    cpu_kernels: Optional["CpuKernels"] = None,
    keep_mask_words: str = "sfc64",
    numeric: Collection[str] = (),
) -> TF4CTR:
    """TF4CTR for ``fields`` = [(name, vocab_size incl. PAD and OOV), ...] in manifest order.

    ``mean_pooled``: the sequence fields; ``numeric``: the fields embedded as value x vector
    (vocab_size 1). With numeric fields every EBC is weighted and its input KJT must carry
    weights (see ``field_tables``; the reader and the serving features give them).

    Build on ``device="meta"`` for DistributedModelParallel; tables are then materialised by
    the sharder on their owning rank. ``fused_dense=False`` runs the encoders as plain
    nn.Sequential stacks (the pre-fusion path, kept for A/B timing); it needs fp32.
    ``cpu_kernels``: the loaded CPU kernels (`tf4ctr_dist.kernels.load(cfg.train.cpu_kernels)`)
    for the MLP encoders' BatchNorm -> ReLU -> dropout, or None for the eager ops.
    ``keep_mask_words``: the dropout masks' random words ("sfc64"; "torch" for A/B timing).
    """
    tables = embedding_tables(fields, cfg, mean_pooled, numeric)
    num_fields = len(fields)
    d = cfg.embedding_dim
    easy = [t for t in tables if t.name.startswith(EASY_PREFIX + "_")]
    hard = [t for t in tables if t.name.startswith(HARD_PREFIX + "_")]

    def ebc(configs: list[EmbeddingBagConfig]) -> EmbeddingBagCollection:
        return EmbeddingBagCollection(tables=configs, is_weighted=bool(numeric), device=torch.device(device))

    embedding = ebc(easy)
    hard_embedding = ebc(hard) if hard else None
    easy_in = num_fields * (d // 2 if hard else d)
    dtype = {"fp32": None, "bf16": torch.bfloat16}[cfg.dense_precision]
    if dtype is not None and not fused_dense:
        raise ValueError(f"dense_precision={cfg.dense_precision} needs fused_dense=True")
    inference_dtype = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16}[cfg.inference_precision]
    enc = dict(dropout=cfg.net_dropout, batch_norm=cfg.batch_norm, fused=fused_dense, compute_dtype=dtype,
               bn_relu_dropout=cpu_kernels, keep_mask_words=keep_mask_words, inference=cfg.inference,
               inference_dtype=inference_dtype)
    opt = cfg.encoders
    simple, simple_head = _branch(cfg.easy_encoder, opt.first_order == "easy", True, num_fields, easy_in // num_fields,
                                  cfg.easy_hidden_units, cfg, enc)
    complex_, complex_head = _branch(cfg.hard_encoder, opt.first_order == "hard", opt.hard_head_bias, num_fields, d,
                                     cfg.hard_hidden_units, cfg, enc)
    linear = [t for t in tables if t.name.startswith(LINEAR_PREFIX + "_")]
    model = TF4CTR(
        embedding=embedding,
        hard_embedding=hard_embedding,
        ssem=build_ssem(cfg.ssem, num_fields * d, cfg.net_dropout),
        simple_encoder=simple,
        complex_encoder=complex_,
        fusion=build_fusion(cfg.dfm, simple.out_dim, complex_.out_dim),
        linear_embedding=ebc(linear) if linear else None,
        simple_head=simple_head,
        complex_head=complex_head,
    )
    return model


def model_for_dataset(
    manifest: "Manifest", cfg: ModelConfig, device: torch.device | str = "cpu",
    cpu_kernels: Optional["CpuKernels"] = None,
) -> TF4CTR:
    """`tf4ctr` for a prepared dataset: its fields in manifest order, its sequence fields
    mean-pooled and its numeric fields weighted, as the readers and the serving features give them."""
    fields = [(f.name, f.vocab_size) for f in manifest.fields]
    return tf4ctr(fields, cfg, device=device, mean_pooled=set(manifest.sequence_fields), cpu_kernels=cpu_kernels,
                  numeric=set(manifest.numeric_fields))


class Objective(nn.Module):
    """Main BCE on the fused logit plus the chosen auxiliary loss on the twin logits.

    loss=tf: BCE(z) + L_TF(z_s, z_c); loss=bce: BCE(z) alone (DualMLP when ssem=share dfm=sum);
    loss=focal / rce / tce: the baseline losses on the fused logit instead of BCE (rce: the
    reweighted CE, tce: the truncated CE, both of Wang et al. 2021); through z they train both
    branches of any parallel backbone, as in the paper's Table 2.
    """

    def __init__(self, cfg: LossConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tce: Optional[TCELoss] = (
            TCELoss(cfg.tce_max_drop_rate, cfg.tce_num_gradual) if cfg.loss == "tce" else None
        )
        self.steps = 0  # training forward passes seen; drives T-CE's growing drop rate

    def forward(
        self, z: torch.Tensor, z_s: torch.Tensor, z_c: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        cfg = self.cfg
        if cfg.loss == "focal":
            return focal_loss(z, labels, valid, gamma=cfg.focal_gamma)
        if cfg.loss == "rce":
            return reweighted_ce_loss(z, labels, valid, beta=cfg.rce_beta)
        if self.tce is not None:
            if self.training:
                self.steps += 1
            return self.tce(z, labels, valid, self.steps)
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
