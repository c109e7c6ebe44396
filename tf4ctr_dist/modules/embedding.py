"""Per-field TorchRec table configs (spec section 1)."""

from __future__ import annotations

import math
from functools import partial
from typing import Collection, Sequence

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType

EMBEDDING_STD = 1e-4


@torch.no_grad()
def init_embedding_rows(
    weight: torch.Tensor, std: float = EMBEDDING_STD, num_embeddings: int = -1, pad_row: bool = True
) -> torch.Tensor:
    """N(0, std) for every row, then zero the PAD row 0 (weight: (rows, dim)).

    PAD ids are dropped upstream, so row 0 is never looked up. A sharded table hands over its
    local shard, which may hold no rows or rows that do not start at global row 0; the PAD row is
    zeroed only when this tensor holds every row of the table. ``pad_row=False``: row 0 is a
    real row (a numeric field's vector) and keeps its random init.
    """
    torch.nn.init.normal_(weight, mean=0.0, std=std)
    holds_all_rows = num_embeddings < 0 or weight.shape[0] == num_embeddings
    if pad_row and holds_all_rows and weight.shape[0] > 0 and weight.device.type != "meta":
        weight[0].zero_()
    return weight


def field_tables(
    prefix: str,
    fields: Sequence[tuple[str, int]],
    dim: int,
    mean_pooled: Collection[str] = (),
    numeric: Collection[str] = (),
) -> list[EmbeddingBagConfig]:
    """One table per field, in field order, named f"{prefix}_{field}".

    fields: (field name, vocabulary size incl. PAD 0 and OOV; 1 for a numeric field). The EBC
    built from these tables returns values() of shape (B, len(fields)*dim) with the field blocks
    in this order.
    mean_pooled: the multi-valued (sequence) fields, mean-pooled over their ids. Every other
    field holds at most one id per sample, where SUM gives the same vector as MEAN and fbgemm's
    CPU kernel computes it several times faster.
    numeric: the fields embedded as value x vector: a one-row table (row 0 is the field's vector
    v_f, not a PAD row) looked up once per sample with the per-sample weight x, so the SUM-pooled
    bag is x * v_f (B, dim); a missing value has no lookup and pools to zeros. With any numeric
    field the tables are for a weighted EBC (``is_weighted=True``, the KJT carries weights):
    nn.EmbeddingBag and fbgemm take per-sample weights with SUM pooling only, so every table
    is SUM-pooled and the data gives ids weight 1 and sequence ids weight 1/len (= MEAN).
    """
    # Sharded kernels (fbgemm TBE) may initialise uniformly from weight_init_min/max before
    # init_fn runs; +-sqrt(3)*std gives that uniform the same std.
    bound = math.sqrt(3.0) * EMBEDDING_STD
    weighted = bool(numeric)
    return [
        EmbeddingBagConfig(
            num_embeddings=vocab_size,
            embedding_dim=dim,
            name=f"{prefix}_{name}",
            feature_names=[name],
            pooling=PoolingType.MEAN if name in mean_pooled and not weighted else PoolingType.SUM,
            weight_init_min=-bound,
            weight_init_max=bound,
            init_fn=partial(init_embedding_rows, std=EMBEDDING_STD,
                            num_embeddings=vocab_size, pad_row=name not in numeric),
        )
        for name, vocab_size in fields
    ]
