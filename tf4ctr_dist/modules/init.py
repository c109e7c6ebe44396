"""Initialisation shared by every dense module (spec section 1)."""

from __future__ import annotations

import torch
from torch import nn


def init_linear(layer: nn.Linear) -> nn.Linear:
    """xavier_normal_ weight, zero bias; returns the layer so it can be used inline."""
    nn.init.xavier_normal_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


@torch.no_grad()
def reset_dense(module: nn.Module) -> None:
    """Re-initialise every dense sub-module of `module` with the project's scheme.

    Needed when dense layers were materialised from "meta": DistributedModelParallel then calls
    each layer's own `reset_parameters()`, which for nn.Linear is kaiming-uniform, not xavier.
    Linear -> init_linear; anything else with a `reset_parameters()` (BatchNorm, learnable fusion
    weights, ...) -> that method. Do not call it on a module that holds embedding tables.
    """
    for m in module.modules():
        if isinstance(m, nn.Linear):
            init_linear(m)
        elif hasattr(m, "reset_parameters"):
            m.reset_parameters()
