"""Per-epoch analyses of a run (the paper's Figs 2, 5, 10 and the gate / fusion values).

Probes hang on the model's modules with hooks, so the model itself stays as it is (and
torch.fx-traceable); the worker loop switches them on around the passes they observe:

- ``GradNormProbe``: ||dL/dz_s|| and ||dL/dz_c|| of every training step (Fig 5): the L2 norm over
  the local batch of the gradient of the rank's loss with respect to the (B, 1) branch logits.
- ``FusionProbe``: per-sample gate and mixing values during evaluation (GM/MoE SSEM gates, VF and
  MoEF mixing weights; mean and std over the split's real samples) and WSF's two weights.
- ``Histogram``: prediction counts in equal-width bins of [0, 1], per label (Fig 2).
- ``DifficultyTelemetry``: live, per window of training steps, how the TF loss sees the samples:
  the share each branch finds easy (p_t >= 0.5) and the mean weight each of its terms gives,
  (c + p_t,s)^gamma on the simple branch and (m - p_t,c)^gamma on the complex one.

Every collective here is called by every rank in the same order (the loop calls them on all ranks).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from tf4ctr_dist.config import ANALYSES  # noqa: F401  (the train.analyses names)


HISTOGRAM_BINS = 20


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        comm = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        u = t.to(comm)
        dist.all_reduce(u)
        return u.to(t.device)
    return t


class Histogram:
    """Prediction counts per label in ``bins`` equal bins of [0, 1]; ``add`` per batch, then
    ``result`` (all-reduced over ranks)."""

    def __init__(self, bins: int = HISTOGRAM_BINS) -> None:
        self.bins = bins
        self.counts = torch.zeros(2, bins, dtype=torch.float64)  # (label 0/1, bins)

    def add(self, probs: torch.Tensor, labels: torch.Tensor, valid: Optional[torch.Tensor] = None) -> None:
        """Called every training step: stays on the batch's device, with padding rows weighted 0
        instead of masked out (no host sync, which a boolean mask would force on a GPU)."""
        p, y = probs.detach().reshape(-1).float(), labels.detach().reshape(-1)
        idx = (p.clamp(0.0, 1.0) * self.bins).long().clamp_max(self.bins - 1) + self.bins * (y > 0.5).long()  # (B,)
        weights = None if valid is None else (valid.detach().reshape(-1) > 0).to(torch.float64)
        counts = torch.bincount(idx, weights=weights, minlength=2 * self.bins).view(2, self.bins)
        if self.counts.device != counts.device:
            self.counts = self.counts.to(counts.device)
        self.counts += counts.to(torch.float64)

    def result(self) -> dict:
        counts = _all_reduce(self.counts)
        edges = np.linspace(0.0, 1.0, self.bins + 1).round(6).tolist()
        return {"edges": edges, "negative": counts[0].long().tolist(), "positive": counts[1].long().tolist()}


class GradNormProbe:
    """Records ||dL/dz_s||_2 and ||dL/dz_c||_2 per backward pass while ``enabled``.

    The norms stay tensors until ``take`` (no device sync per step)."""

    def __init__(self, model: nn.Module) -> None:
        self.enabled = False
        self._norms: dict[str, list] = {"simple": [], "complex": []}
        self._handles = [model.simple_head.register_forward_hook(self._hook("simple")),
                         model.complex_head.register_forward_hook(self._hook("complex"))]

    def _hook(self, name: str):
        def forward_hook(module, inputs, out):
            if self.enabled and torch.is_grad_enabled() and out.requires_grad:
                out.register_hook(lambda g: self._norms[name].append(g.detach().float().norm()))
        return forward_hook

    def take(self) -> dict[str, list[float]]:
        out = {k: [float(v) for v in vs] for k, vs in self._norms.items()}
        self._norms = {"simple": [], "complex": []}
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class FusionProbe:
    """Gate / mixing values of the SSEM and DFM, observed during evaluation passes.

    ``keep(mask)`` after each batch drops padded rows; ``result()`` gives
    {name: {"mean": [k values], "std": [k values]}} over all ranks, plus WSF's {"w_s", "w_c"}.
    """

    def __init__(self, model: nn.Module) -> None:
        from tf4ctr_dist.modules.fusion import MoEFusion, VariationalFusion, WeightedSumFusion
        from tf4ctr_dist.modules.ssem import GateSSEM, MoESSEM

        self.active = False
        self.model = model
        self._batch: dict[str, torch.Tensor] = {}
        self._sums: dict[str, torch.Tensor] = {}
        self._names: list[str] = []
        self._handles = []
        ssem, fusion = model.ssem, model.fusion
        if isinstance(ssem, GateSSEM):
            self._watch(ssem.gate, "ssem_gate", lambda m, i, o: torch.sigmoid(o))  # (B, 1)
        elif isinstance(ssem, MoESSEM):
            self._watch(ssem.gate_es, "ssem_gate_easy", lambda m, i, o: torch.softmax(o, -1))  # (B, K)
            self._watch(ssem.gate_hs, "ssem_gate_hard", lambda m, i, o: torch.softmax(o, -1))
        if isinstance(fusion, VariationalFusion):
            # Eval mode: the deterministic mixing softmax(pi / tau) that produced z.
            self._watch(fusion, "vf_mix", lambda m, i, o: torch.softmax(
                torch.cat([m.score_s(i[2]), m.score_c(i[3])], dim=1) / m.tau, -1))  # (B, 2)
        elif isinstance(fusion, MoEFusion):
            self._watch(fusion.gate, "moef_gate", lambda m, i, o: torch.softmax(o, -1))  # (B, 2)
        self._wsf = fusion if isinstance(fusion, WeightedSumFusion) else None

    def _watch(self, module: nn.Module, name: str, value) -> None:
        self._names.append(name)

        def forward_hook(m, inputs, out):
            if self.active:
                with torch.no_grad():
                    self._batch[name] = value(m, inputs, out).detach().float()

        self._handles.append(module.register_forward_hook(forward_hook))

    def keep(self, mask: torch.Tensor) -> None:
        """Fold the values of the batch just run into the sums, its real rows only."""
        for name, v in self._batch.items():
            rows = v[mask.reshape(-1).to(v.device)]  # (n, k)
            count = torch.full((v.shape[1],), float(rows.shape[0]), device=v.device)
            stats = torch.stack([count, rows.sum(0), (rows * rows).sum(0)])  # (3, k)
            self._sums[name] = self._sums.get(name, 0) + stats.double().cpu()  # (3, k)
        self._batch = {}

    def result(self) -> dict:
        out: dict = {}
        for name in self._names:  # same order on every rank
            s = self._sums.get(name)
            if s is None:
                s = torch.zeros(3, 1, dtype=torch.float64)
            s = _all_reduce(s)
            n = s[0].clamp_min(1.0)
            mean = s[1] / n
            std = (s[2] / n - mean * mean).clamp_min(0.0).sqrt()
            out[name] = {"mean": mean.tolist(), "std": std.tolist()}
        self._sums = {}
        if self._wsf is not None:
            out["wsf"] = {"w_s": float(self._wsf.w_s), "w_c": float(self._wsf.w_c)}
        return out


TELEMETRY_WINDOWS_PER_EPOCH = 10


class DifficultyTelemetry:
    """Per window of training steps: how the TF loss splits the samples (a forward hook on the
    train wrapper's objective, which sees z, z_s, z_c (B, 1), the labels and the valid mask).

    ``window_result(step)`` closes the window (one device sync) and returns this rank's values;
    ``epoch_result()`` returns every window of the epoch summed over all ranks (a collective)."""

    def __init__(self, objective: nn.Module, c: float, m: float, gamma: float) -> None:
        self.enabled = False
        self.c, self.m, self.gamma = c, m, gamma
        # (6,) float64 on the batch's device until the window closes: samples, easy (fused, simple,
        # complex), summed weights (simple, complex)
        self._sums: Optional[torch.Tensor] = None
        self._closed: list[tuple[int, torch.Tensor]] = []  # (step, sums (6,)) of this epoch
        self._handle = objective.register_forward_hook(self._hook)

    def _hook(self, module, inputs, out) -> None:
        if not (self.enabled and module.training):
            return
        z, z_s, z_c, labels, valid = inputs
        with torch.no_grad():
            y = labels.reshape(-1).float()  # (B,)
            v = valid.reshape(-1).float()  # (B,)

            def p_t(logit: torch.Tensor) -> torch.Tensor:
                p = torch.sigmoid(logit.detach().reshape(-1).float())  # (B,)
                return y * p + (1.0 - y) * (1.0 - p)

            pt_f, pt_s, pt_c = p_t(z), p_t(z_s), p_t(z_c)
            row = torch.stack([v.sum(), ((pt_f >= 0.5) * v).sum(), ((pt_s >= 0.5) * v).sum(),
                               ((pt_c >= 0.5) * v).sum(), ((self.c + pt_s) ** self.gamma * v).sum(),
                               ((self.m - pt_c) ** self.gamma * v).sum()]).double()  # (6,)
            self._sums = row if self._sums is None else self._sums + row

    @staticmethod
    def _means(step: int, sums: torch.Tensor) -> dict:
        samples, *rest = sums.tolist()  # one device sync per window
        means = [v / max(samples, 1.0) for v in rest]
        return {"step": step, "samples": int(samples), "easy_share_fused": means[0], "easy_share_simple": means[1],
                "easy_share_complex": means[2], "mean_weight_simple": means[3], "mean_weight_complex": means[4]}

    def window_result(self, step: int) -> Optional[dict]:
        """Close the window ending at ``step`` (steps of this epoch); None if it saw no batch."""
        if self._sums is None:
            return None
        sums, self._sums = self._sums, None
        self._closed.append((step, sums))
        return self._means(step, sums)

    def epoch_result(self) -> list[dict]:
        """This epoch's windows over all ranks (every rank closes the same windows in lock step)."""
        closed, self._closed, self._sums = self._closed, [], None
        if not closed:
            return []
        stacked = _all_reduce(torch.stack([s for _, s in closed]).double().cpu())  # (windows, 6)
        return [self._means(step, row) for (step, _), row in zip(closed, stacked)]

    def remove(self) -> None:
        self._handle.remove()


class Probes:
    """The probes ``train.analyses`` asks for, on ``module`` (the train wrapper: ``.model`` is a
    TF4CTR, ``.objective`` its loss). ``telemetry`` needs the TF loss: the others have no twin terms."""

    def __init__(self, module: nn.Module, analyses: Sequence[str]) -> None:
        self.analyses = set(analyses)
        model = module.model
        self.grad_norms = GradNormProbe(model) if "grad_norms" in self.analyses else None
        self.fusion = FusionProbe(model) if "fusion" in self.analyses else None
        loss = module.objective.cfg
        self.telemetry = None
        if "telemetry" in self.analyses and loss.loss == "tf":
            m = 2.0 - loss.c if loss.m is None else loss.m
            self.telemetry = DifficultyTelemetry(module.objective, loss.c, m, loss.gamma)

    def wants(self, name: str) -> bool:
        return name in self.analyses
