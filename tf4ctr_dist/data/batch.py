"""The unit of work that flows from the Parquet reader into the TorchRec train pipeline."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable


@dataclass
class Batch(Pipelineable):
    """One local batch of B samples.

    sparse_features: KJT keyed by field name (manifest order); ids already vocabulary-mapped,
        PAD (id 0) removed, so a field with no ids pools to the zero vector. With numeric
        fields it carries weights (tokens.lookup_weights); without, none.
    labels:     (B,) float32 in {0, 1}.
    group_ids:  (B,) int64 group key for gAUC (0 when the dataset has no group column).
    sample_ids: (B,) int64 row index within the split (stable across epochs and world sizes).
    valid:      (B,) float32, 1 for a real sample, 0 for padding that keeps ranks in lock-step.
    """

    sparse_features: KeyedJaggedTensor
    labels: torch.Tensor
    group_ids: torch.Tensor
    sample_ids: torch.Tensor
    valid: torch.Tensor

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        return Batch(
            sparse_features=self.sparse_features.to(device=device, non_blocking=non_blocking),
            labels=self.labels.to(device=device, non_blocking=non_blocking),
            group_ids=self.group_ids.to(device=device, non_blocking=non_blocking),
            sample_ids=self.sample_ids.to(device=device, non_blocking=non_blocking),
            valid=self.valid.to(device=device, non_blocking=non_blocking),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        self.sparse_features.record_stream(stream)
        for t in (self.labels, self.group_ids, self.sample_ids, self.valid):
            t.record_stream(stream)

    def pin_memory(self) -> "Batch":
        return Batch(
            sparse_features=self.sparse_features.pin_memory(),
            labels=self.labels.pin_memory(),
            group_ids=self.group_ids.pin_memory(),
            sample_ids=self.sample_ids.pin_memory(),
            valid=self.valid.pin_memory(),
        )

    @property
    def size(self) -> int:
        return int(self.labels.numel())
