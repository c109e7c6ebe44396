"""Run the backward passes behind several tensors on separate threads.

Why: fbgemm's CPU table kernels (TBE forward, and backward fused with the row-wise Adagrad
update) are built without OpenMP, so each runs on one core however many intra-op threads torch
has. With SER's two table sets on one worker, the two backward+update kernels are the last thing
in every step and ran one after the other while the other core idled (about 20 ms each at batch
4096 on the Criteo-shaped benchmark). Here each set's backward gets its own thread.

Only for graphs that share nothing and run no collectives: on several ranks the backward of a
sharded table set runs an all-to-all, and two threads would issue those in a different order on
different ranks. The distributed layer decides when it is safe (see `shard_model`).
"""

from __future__ import annotations

import threading
from typing import Optional

import torch


class _ConcurrentBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, sources: tuple[torch.Tensor, ...], *leaves: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        # `sources` arrives as one tuple, which autograd does not treat as an input: their graphs
        # stay out of this node's edges and are run by hand in backward.
        ctx.sources = sources
        return tuple(leaf.view_as(leaf) for leaf in leaves)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> tuple[None, ...]:  # type: ignore[override]
        tensors: Optional[tuple[torch.Tensor, ...]] = ctx.sources
        ctx.sources = None
        if tensors is None:
            raise RuntimeError("backward_concurrently: backward through the same graph a second time")
        errors: list[BaseException] = []

        def run(tensor: torch.Tensor, grad: torch.Tensor) -> None:
            try:
                torch.autograd.backward(tensor, grad)
            except BaseException as e:  # re-raised on the calling thread below
                errors.append(e)

        threads = [
            threading.Thread(target=run, args=(t, g), name=f"tf4ctr-backward-{i}", daemon=True)
            for i, (t, g) in enumerate(zip(tensors[1:], grads[1:]), start=1)
        ]
        for th in threads:
            th.start()
        run(tensors[0], grads[0])
        for th in threads:
            th.join()
        if errors:
            raise errors[0]
        return (None,) * (1 + len(grads))


def backward_concurrently(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Identity on `tensors`; in backward, the graphs behind them run on one thread each.

    The results are cut off from the inputs' graphs (autograd sees leaves), and the backward of
    this op calls `torch.autograd.backward` on every input with its gradient, the first on the
    calling thread. The input graphs must be disjoint. Gradients are the same as without it.
    """
    if not torch.is_grad_enabled() or not all(t.requires_grad for t in tensors):
        return tensors
    leaves = [t.detach().requires_grad_() for t in tensors]
    return _ConcurrentBackward.apply(tuple(tensors), *leaves)
