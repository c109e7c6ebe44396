"""The single-device scoring module: raw feature values -> ids -> TF4CTR -> probabilities."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tf4ctr_dist.modules.encoders import first_order_weights
from tf4ctr_dist.modules.tf4ctr import TF4CTR, _in_order
from tf4ctr_dist.serving.features import FieldMapper, to_table


class DenseProgram(nn.Module):
    """Everything of TF4CTR after the embedding lookups, as one plain tensor program (what
    torch.export takes for a C++ / Triton-style server; the tables stay a lookup service).

    forward(h_es (B, F*d_s), h_hs (B, F*d) [, lin (B, F*FIRST_ORDER_DIM)]) -> probabilities (B,).
    Without the twin table set (ssem other than ser) h_hs is ignored and h_es is h (B, F*d).
    """

    def __init__(self, model: TF4CTR) -> None:
        super().__init__()
        self.ssem = model.ssem
        self.simple_encoder = model.simple_encoder
        self.complex_encoder = model.complex_encoder
        self.simple_head = model.simple_head
        self.complex_head = model.complex_head
        self.fusion = model.fusion
        self.twin = model.hard_embedding is not None
        self.num_linear = len(model._linear_keys)
        self.simple_first_order = model._simple_first_order
        self.complex_first_order = model._complex_first_order

    def forward(self, h_es: torch.Tensor, h_hs: torch.Tensor, lin: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not self.twin:
            h_es, h_hs = self.ssem(h_es)
        if lin is None:
            v_s = self.simple_encoder(h_es)  # (B, last_s)
            v_c = self.complex_encoder(h_hs)  # (B, last_c)
        else:
            w = first_order_weights(lin, self.num_linear)  # (B, F)
            v_s = self.simple_encoder(h_es, w) if self.simple_first_order else self.simple_encoder(h_es)
            v_c = self.complex_encoder(h_hs, w) if self.complex_first_order else self.complex_encoder(h_hs)
        z = self.fusion(self.simple_head(v_s), self.complex_head(v_c), v_s, v_c)  # (B, 1)
        return torch.sigmoid(z).view(-1)  # (B,)


class Scorer(nn.Module):
    """TF4CTR on one device with the dataset's feature mapping; always in eval mode.

    forward(features: KJT keyed by field, ids already mapped) -> probabilities (B,) float32.
    score(rows) maps raw values first (see tf4ctr_dist.serving.features) and returns a numpy
    array of probabilities, one per row.
    """

    def __init__(self, model: TF4CTR, mappers: Sequence[FieldMapper], label: str, group: Optional[str],
                 info: Optional[dict[str, Any]] = None) -> None:
        super().__init__()
        self.model = model
        self.dense = DenseProgram(model)
        self.mappers = list(mappers)
        self.feature_names = [m.name for m in self.mappers]
        self._lists = {m.name for m in self.mappers if m.kind == "sequence"}  # fields whose raw value may be a list
        self.label = label
        self.group = group
        self.info = dict(info or {})
        self.eval()

    @property
    def raw_columns(self) -> Optional[list[str]]:
        """The column order of the raw files the dataset was prepared from, when its manifest
        recorded it (spec.raw_columns): the columns of raw text input without a header line."""
        return self.info.get("raw_columns")

    def train(self, mode: bool = True) -> "Scorer":  # a scorer never trains (dropout, BN stay off)
        return super().train(False)

    def pooled(self, features: KeyedJaggedTensor) -> tuple[torch.Tensor, ...]:
        """The embedding lookups: (h_es, h_hs[, lin]) as DenseProgram takes them."""
        m = self.model
        h_es = _in_order(m.embedding(features), m._easy_keys)  # (B, F*d_s)
        h_hs = _in_order(m.hard_embedding(features), m._hard_keys) if m.hard_embedding is not None else h_es
        if m.linear_embedding is None:
            return h_es, h_hs
        return h_es, h_hs, _in_order(m.linear_embedding(features), m._linear_keys)

    @torch.no_grad()
    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        return self.dense(*self.pooled(features))

    def features(self, rows: Any) -> KeyedJaggedTensor:
        """Raw rows (see features.to_table) -> the KJT of mapped ids (field-major, PAD dropped),
        with weights when the model has value x vector fields (its tables are weighted)."""
        table = to_table(rows, self.feature_names, self._lists)
        n = table.num_rows
        weighted = self.model.embedding.is_weighted()
        values, lengths, weights = [], [], []
        for m in self.mappers:
            v, l, w = m.lookups(table.column(m.name), weighted)
            values.append(v)
            lengths.append(l if len(l) == n else np.zeros(n, np.int32))
            weights.append(w)
        return KeyedJaggedTensor(
            keys=self.feature_names,
            values=torch.from_numpy(np.ascontiguousarray(np.concatenate(values) if values else [], dtype=np.int64)),
            lengths=torch.from_numpy(np.concatenate(lengths).astype(np.int32)),
            weights=torch.from_numpy(np.concatenate(weights).astype(np.float32)) if weighted else None,
        )

    @torch.no_grad()
    def score(self, rows: Any, batch_size: int = 65_536) -> np.ndarray:
        """Probabilities (n,) float32 of raw rows (dict column -> values, list of row dicts,
        pyarrow table or pandas frame)."""
        table = to_table(rows, self.feature_names, self._lists)
        out = [self(self.features(table.slice(a, batch_size))).numpy() for a in range(0, table.num_rows, batch_size)]
        return np.concatenate(out) if out else np.zeros(0, np.float32)
