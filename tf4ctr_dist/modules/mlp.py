"""Plain MLP encoder used for MLP_s and MLP_c (spec section 3)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from tf4ctr_dist.modules.init import init_linear


class MLPEncoder(nn.Module):
    """Hidden layers Linear -> BatchNorm1d -> ReLU -> Dropout, no output layer.

    forward: x (B, in_dim) -> (B, out_dim), out_dim = hidden_units[-1] (in_dim if no layer).
    """

    def __init__(
        self,
        in_dim: int,
        hidden_units: Sequence[int],
        dropout: float,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_dim
        for units in hidden_units:
            layers.append(init_linear(nn.Linear(prev, units)))
            if batch_norm:
                layers.append(nn.BatchNorm1d(units))
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            prev = units
        self.net = nn.Sequential(*layers)
        self.in_dim = in_dim
        self.out_dim = prev

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
