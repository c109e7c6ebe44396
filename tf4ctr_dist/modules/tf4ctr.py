"""The TF4CTR model: embeddings -> SSEM -> twin encoders + heads -> DFM (spec sections 1-4)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from tf4ctr_dist.modules.concurrent import backward_concurrently
from tf4ctr_dist.modules.encoders import first_order_weights
from tf4ctr_dist.modules.init import init_linear, reset_dense
from tf4ctr_dist.modules.ssem import ShareSSEM


def _feature_order(ebc: Optional[EmbeddingBagCollection]) -> list[str]:
    """The EBC's pooled keys in table order (= field order for `field_tables`)."""
    if ebc is None:
        return []
    return [f for cfg in ebc.embedding_bag_configs() for f in cfg.feature_names]


def _in_order(pooled: KeyedTensor, keys: list[str], reuse: bool = True) -> torch.Tensor:
    """values() of `pooled` with the key blocks in `keys` order: (B, sum of dims).

    A sharded EBC returns its keys grouped by sharding (e.g. table-wise: the tables of rank 0
    first), not in table order; the encoders need the field blocks in a fixed order. When the
    keys already are in that order (one worker, an unsharded EBC) values() is that tensor and
    the regroup (a full copy forward and backward) is skipped unless `reuse` is False.
    """
    if reuse and pooled.keys() == keys:
        return pooled.values()
    return KeyedTensor.regroup([pooled], [keys])[0]


# Leaves for torch.fx (TorchRec's pipeline traces the model): they branch on their inputs.
torch.fx.wrap("_in_order")
torch.fx.wrap("backward_concurrently")


def _param_device(module: nn.Module) -> Optional[torch.device]:
    for p in module.parameters():
        return p.device
    return None


class TF4CTR(nn.Module):
    """TF4CTR assembled from ready-made parts.

    embedding:      EBC with one table per field, in field order (see `field_tables`); its
                    values() are h (B, F*d), or h_es (B, F*d/2) when `hard_embedding` is given.
    hard_embedding: the second table set of SSEM `ser` (dim d), giving h_hs (B, F*d); None otherwise.
    ssem:           maps h -> (h_es, h_hs); must be None or ShareSSEM with `ser`.
    simple_encoder / complex_encoder: modules with `out_dim`, (B, in) -> (B, out_dim); one with
                    `uses_first_order` is called as encoder(h, w), w (B, F) (modules/encoders.py).
    fusion:         DFM module, (z_s, z_c, v_s, v_c) -> z (B, 1).
    device:         where to create the two heads; default: the device of simple_encoder's
                    parameters (so a model built on "meta" gets meta heads), else cpu.
    linear_embedding: the first-order (LR) table set, one FIRST_ORDER_DIM table per field, in
                    field order; needed iff an encoder `uses_first_order`.
    simple_head / complex_head: the branch heads, (B, out_dim) -> (B, 1) logit; default
                    Linear(out_dim, 1) (xavier). nn.Identity for an encoder that `emits_logit`.

    forward(features: KJT) -> (z, z_s, z_c), each (B, 1) logits.

    Placement: the usual TorchRec recipe is embeddings on "meta" and dense parts on cpu, so the
    dense init done here survives DistributedModelParallel. If the dense parts were built on
    "meta" too, call `reset_dense_parameters()` after DMP materialises them, with the same seed
    on every rank (DMP would otherwise leave kaiming-initialised Linear layers).
    """

    def __init__(
        self,
        embedding: EmbeddingBagCollection,
        hard_embedding: Optional[EmbeddingBagCollection],
        ssem: Optional[nn.Module],
        simple_encoder: nn.Module,
        complex_encoder: nn.Module,
        fusion: nn.Module,
        device: Optional[torch.device] = None,
        linear_embedding: Optional[EmbeddingBagCollection] = None,
        simple_head: Optional[nn.Module] = None,
        complex_head: Optional[nn.Module] = None,
    ) -> None:
        super().__init__()
        if ssem is None:
            ssem = ShareSSEM()
        if hard_embedding is not None and any(True for _ in ssem.parameters()):
            raise ValueError("with two embedding table sets (ser) the ssem must be None/ShareSSEM")
        if device is None:
            device = _param_device(simple_encoder) or torch.device("cpu")
        self.embedding = embedding
        self.hard_embedding = hard_embedding
        self.ssem = ssem
        self.simple_encoder = simple_encoder
        self.complex_encoder = complex_encoder
        self._simple_first_order = bool(getattr(simple_encoder, "uses_first_order", False))
        self._complex_first_order = bool(getattr(complex_encoder, "uses_first_order", False))
        if (self._simple_first_order or self._complex_first_order) != (linear_embedding is not None):
            raise ValueError("linear_embedding (the first-order tables) is needed exactly when an encoder uses_first_order")
        self.linear_embedding = linear_embedding
        self._linear_keys = _feature_order(linear_embedding)
        if simple_head is None:
            simple_head = init_linear(nn.Linear(simple_encoder.out_dim, 1, device=device))
        if complex_head is None:
            complex_head = init_linear(nn.Linear(complex_encoder.out_dim, 1, device=device))
        self.simple_head = simple_head
        self.complex_head = complex_head
        self.fusion = fusion
        self._easy_keys = _feature_order(embedding)
        self._hard_keys = _feature_order(hard_embedding)
        self.reuse_ordered_embeddings = True  # False: always regroup (the old path, for A/B timing)
        # True: the two table sets' backward passes run on two threads (`backward_concurrently`);
        # set by the distributed layer where that is safe (one CPU worker, fused tables).
        self.concurrent_table_backward = False

    def dense_modules(self) -> list[nn.Module]:
        """Every part except the embedding tables."""
        return [
            self.ssem,
            self.simple_encoder,
            self.complex_encoder,
            self.simple_head,
            self.complex_head,
            self.fusion,
        ]

    def reset_dense_parameters(self) -> None:
        """Re-apply the dense init (xavier Linear, fresh BN, wsf = 0.5); tables untouched."""
        for m in self.dense_modules():
            reset_dense(m)

    def forward(
        self, features: KeyedJaggedTensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.hard_embedding is None:
            h = _in_order(self.embedding(features), self._easy_keys, self.reuse_ordered_embeddings)  # (B, F*d)
            h_es, h_hs = self.ssem(h)
        else:
            reuse = self.reuse_ordered_embeddings
            h_es = _in_order(self.embedding(features), self._easy_keys, reuse)  # (B, F*d/2)
            h_hs = _in_order(self.hard_embedding(features), self._hard_keys, reuse)  # (B, F*d)
            if self.concurrent_table_backward:
                h_es, h_hs = backward_concurrently(h_es, h_hs)
        if self.linear_embedding is None:
            v_s = self.simple_encoder(h_es)  # (B, last_s)
            v_c = self.complex_encoder(h_hs)  # (B, last_c)
        else:
            lin = _in_order(self.linear_embedding(features), self._linear_keys, self.reuse_ordered_embeddings)
            w = first_order_weights(lin, len(self._linear_keys))  # (B, F)
            v_s = self.simple_encoder(h_es, w) if self._simple_first_order else self.simple_encoder(h_es)
            v_c = self.complex_encoder(h_hs, w) if self._complex_first_order else self.complex_encoder(h_hs)
        z_s = self.simple_head(v_s)  # (B, 1)
        z_c = self.complex_head(v_c)  # (B, 1)
        z = self.fusion(z_s, z_c, v_s, v_c)  # (B, 1)
        return z, z_s, z_c
