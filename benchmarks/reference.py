"""The plain single-process baseline: TF4CTR the way a FuxiCTR user runs it.

Per-field ``nn.Embedding`` tables, one dense Adam over every parameter, the full-table
(lambda/2)*||E||^2 penalty in the loss, gradient clipping over all parameters, batches sliced
from in-memory tensors. Used as the yardstick for speed (`python -m benchmarks`) and for checking
that the distributed system learns like the reference on the same data.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from tf4ctr_dist.config import LossConfig, ModelConfig
from tf4ctr_dist.losses import bce_loss, twin_focus_loss
from tf4ctr_dist.metrics import evaluate
from tf4ctr_dist.model import build_fusion, build_ssem
from tf4ctr_dist.modules.embedding import EMBEDDING_STD
from tf4ctr_dist.modules.init import init_linear
from tf4ctr_dist.modules.mlp import MLPEncoder


class FieldEmbeddings(nn.Module):
    """One nn.Embedding per field; ids (B, F) -> (B, F*dim). Row 0 is PAD (zero, no gradient)."""

    def __init__(self, vocab_sizes: Sequence[int], dim: int) -> None:
        super().__init__()
        self.tables = nn.ModuleList(nn.Embedding(v, dim, padding_idx=0) for v in vocab_sizes)
        for t in self.tables:
            nn.init.normal_(t.weight, std=EMBEDDING_STD)
            with torch.no_grad():
                t.weight[0].zero_()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.cat([t(ids[:, i]) for i, t in enumerate(self.tables)], dim=1)  # (B, F*dim)


class ReferenceTF4CTR(nn.Module):
    """forward(ids (B, F) int64) -> (z, z_s, z_c), each (B, 1)."""

    def __init__(self, vocab_sizes: Sequence[int], cfg: ModelConfig) -> None:
        super().__init__()
        f, d = len(vocab_sizes), cfg.embedding_dim
        ser = cfg.ssem == "ser"
        self.embedding = FieldEmbeddings(vocab_sizes, d // 2 if ser else d)
        self.hard_embedding = FieldEmbeddings(vocab_sizes, d) if ser else None
        self.ssem = build_ssem(cfg.ssem, f * d, cfg.net_dropout)
        self.simple_encoder = MLPEncoder(f * (d // 2 if ser else d), cfg.easy_hidden_units, cfg.net_dropout, cfg.batch_norm)
        self.complex_encoder = MLPEncoder(f * d, cfg.hard_hidden_units, cfg.net_dropout, cfg.batch_norm)
        self.simple_head = init_linear(nn.Linear(self.simple_encoder.out_dim, 1))
        self.complex_head = init_linear(nn.Linear(self.complex_encoder.out_dim, 1))
        self.fusion = build_fusion(cfg.dfm, self.simple_encoder.out_dim, self.complex_encoder.out_dim)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.embedding(ids)
        if self.hard_embedding is not None:
            h_es, h_hs = h, self.hard_embedding(ids)
        else:
            h_es, h_hs = self.ssem(h)
        v_s, v_c = self.simple_encoder(h_es), self.complex_encoder(h_hs)
        z_s, z_c = self.simple_head(v_s), self.complex_head(v_c)
        return self.fusion(z_s, z_c, v_s, v_c), z_s, z_c

    def embedding_penalty(self) -> torch.Tensor:
        """sum over every row of every table of ||E_r||^2 (the authors' full-table form)."""
        tables = list(self.embedding.tables) + (list(self.hard_embedding.tables) if self.hard_embedding else [])
        return sum(t.weight.pow(2).sum() for t in tables)  # type: ignore[return-value]


@dataclass
class ReferenceStep:
    """One training step of the reference: loss, backward, clip over all params, Adam."""

    model: ReferenceTF4CTR
    loss_cfg: LossConfig
    emb_reg: float
    clip: float = 10.0
    lr: float = 1e-3
    clip_embeddings: bool = True  # FuxiCTR clips the norm over every parameter, tables included

    def __post_init__(self) -> None:
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.lr)

    def __call__(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        y = labels.view(-1, 1)
        valid = torch.ones_like(y)
        self.optimizer.zero_grad()
        z, z_s, z_c = self.model(ids)
        loss = bce_loss(z, y, valid)
        if self.loss_cfg.loss == "tf":
            c = self.loss_cfg
            loss = loss + twin_focus_loss(z_s, z_c, y, valid, alpha=c.alpha, c=c.c, gamma=c.gamma, m=c.m)
        if self.emb_reg > 0:
            loss = loss + 0.5 * self.emb_reg * self.model.embedding_penalty()
        loss.backward()
        params = (
            list(self.model.parameters())
            if self.clip_embeddings
            else [p for n, p in self.model.named_parameters() if "embedding" not in n]
        )
        nn.utils.clip_grad_norm_(params, self.clip)
        self.optimizer.step()
        return loss.detach()


@torch.no_grad()
def predict(model: ReferenceTF4CTR, ids: torch.Tensor, batch_size: int = 20000) -> np.ndarray:
    model.eval()
    out = [torch.sigmoid(model(ids[i : i + batch_size])[0]).view(-1) for i in range(0, len(ids), batch_size)]
    model.train()
    return torch.cat(out).numpy()


def train_reference(
    train: tuple[torch.Tensor, torch.Tensor],
    valid: tuple[torch.Tensor, torch.Tensor, Optional[np.ndarray]],
    vocab_sizes: Sequence[int],
    model_cfg: ModelConfig,
    loss_cfg: LossConfig,
    *,
    batch_size: int,
    epochs: int,
    emb_reg: float,
    seed: int,
    log: bool = True,
    clip_embeddings: bool = True,
) -> tuple[ReferenceTF4CTR, list[dict]]:
    """Train the reference on in-memory tensors with the published protocol; returns the model
    with the best epoch's weights reloaded, and the per-epoch valid metrics."""
    torch.manual_seed(seed)
    model = ReferenceTF4CTR(vocab_sizes, model_cfg)
    step = ReferenceStep(model, loss_cfg, emb_reg, clip_embeddings=clip_embeddings)
    ids, labels = train
    history = []
    best, best_state, bad = -float("inf"), None, 0
    for epoch in range(epochs):
        t0 = time.perf_counter()
        perm = torch.randperm(len(ids))
        for i in range(0, len(ids), batch_size):
            idx = perm[i : i + batch_size]
            step(ids[idx], labels[idx])
        metrics = evaluate(valid[1].numpy(), predict(model, valid[0]), valid[2])
        metrics["seconds"] = time.perf_counter() - t0
        history.append(metrics)
        if log:
            print(f"[reference] epoch {epoch + 1}: " + " ".join(f"{k} {v:.6f}" for k, v in metrics.items()), flush=True)
        # The published protocol: monitor AUC (+ gAUC), lr x0.1 on plateau, stop after 2.
        score = metrics["AUC"] + metrics.get("gAUC", 0.0)
        if score > best + 1e-6:
            best, bad = score, 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
            for group in step.optimizer.param_groups:
                group["lr"] = max(group["lr"] * 0.1, 1e-6)
            if bad >= 2:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    return model, history
