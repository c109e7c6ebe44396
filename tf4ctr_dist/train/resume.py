"""What a training run must remember to continue exactly: progress, checkpoints, warm starts.

A checkpoint taken after batch S of epoch E holds the sharded tables with their fused optimizer
state, the dense weights with Adam's moments, BatchNorm statistics, the lr decay and early
stopping state, the history, every rank's RNG state and partial epoch sums, and (optionally)
how often each training sample was used. The readers are deterministic functions of
(seed, epoch, rank, world size), so "batch S of epoch E" is each rank's exact reader position:
after a restart every rank continues with batch S + 1 and the same dropout masks.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist

from tf4ctr_dist.config import ConfigError, RunConfig
from tf4ctr_dist.distributed.checkpoint import (
    INDEX,
    CheckpointEntry,
    CheckpointStore,
    checkpoint_root,
    materialize_optimizer_state,
)
from tf4ctr_dist.distributed.sharding import leaf_optimizers, scale_lr
from tf4ctr_dist.model import Objective
from tf4ctr_dist.train import faults

# Settings that must not change when a run continues from its checkpoints.
_FIXED_ON_RESUME = ("data.url", "model", "loss", "train.batch_size", "train.seed", "train.sharding",
                    "train.embedding_optimizer", "train.emb_reg_mode", "data.shuffle", "data.shuffle_buffer_rows")


@dataclass
class EarlyStopping:
    """The published protocol: mode max, improvement means > best + 1e-6; otherwise decay lr
    and count; stop when the count reaches ``patience``."""

    patience: int
    best: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0

    def update(self, score: float, epoch: int) -> bool:
        """Returns True when ``score`` improved on the best so far."""
        if not math.isfinite(score):
            # NaN compares false with everything: it would silently count as "no improvement",
            # decay the lr and stop early. The splits are checked before training, so this is a
            # diverged model (or a metric that cannot be computed): stop with the reason.
            raise ValueError(
                f"the monitored validation score is {score} after epoch {epoch + 1}: the model diverged "
                "(try a lower lr or train.clip_grad_norm) or a validation metric is undefined"
            )
        if score > self.best + 1e-6:
            self.best, self.best_epoch, self.bad_epochs = score, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience


@dataclass
class Progress:
    """Where training stands: continue at batch ``step`` of ``epoch`` (0-based)."""

    lr: float
    stopper: EarlyStopping
    epoch: int = 0
    step: int = 0
    lr_scale: float = 1.0  # product of the plateau decays applied so far
    finished: bool = False
    history: list[dict] = field(default_factory=list)


@dataclass
class EpochSums:
    """This rank's running sums over the batches of the current epoch."""

    loss: Any = 0.0  # a float64 tensor while training (no host sync per step)
    steps: int = 0
    samples: int = 0


class SampleCounter:
    """How many times each training sample (row index in the split) was used this epoch."""

    def __init__(self, rows: int) -> None:
        self.counts = torch.zeros(rows, dtype=torch.int32)

    def add(self, sample_ids: torch.Tensor) -> None:
        ids = sample_ids.cpu()
        self.counts.index_add_(0, ids, torch.ones_like(ids, dtype=torch.int32))

    def summary_and_reset(self) -> dict[str, int]:
        """Sum over ranks: {"rows", "unused", "once", "more"}; then start the next epoch at 0."""
        total = self.counts.clone()
        if dist.is_initialized():
            dist.all_reduce(total)
        self.counts.zero_()
        return {"rows": int(total.numel()), "unused": int((total == 0).sum()),
                "once": int((total == 1).sum()), "more": int((total > 1).sum())}


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def changed_settings(saved: dict, current: dict) -> list[str]:
    """The ``_FIXED_ON_RESUME`` settings that differ between two config dicts."""
    a, b = _flatten(saved), _flatten(current)
    keys = [k for k in sorted(set(a) | set(b)) if any(k == f or k.startswith(f + ".") for f in _FIXED_ON_RESUME)]
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


class Checkpointing:
    """Saves and restores one worker's share of a run (every rank holds one)."""

    def __init__(self, cfg: RunConfig, ctx, dmp: torch.nn.Module, optimizer, plan_text: str) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.dmp = dmp
        self.optimizer = optimizer
        self.plan_text = plan_text
        # A group of its own: checkpoint collectives never queue behind the pipeline's input
        # all-to-alls (which may be in flight for the batches it has read ahead).
        pg = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self.root = checkpoint_root(cfg.out, cfg.checkpoint.root)
        self.store = CheckpointStore(self.root, ctx.rank, ctx.world_size, keep=cfg.checkpoint.keep, pg=pg,
                                     retry_seconds=cfg.data.storage_retry_seconds)
        self.objective = next((m for m in dmp.modules() if isinstance(m, Objective)), None)
        self._optimizer_ready = False

    def _log(self, msg: str) -> None:
        if self.ctx.rank == 0:
            print(f"[tf4ctr] {msg}", flush=True)

    def _app_state(self, with_optimizer: bool = True) -> dict[str, Any]:
        state: dict[str, Any] = {"model": self.dmp.state_dict()}
        if with_optimizer:
            if not self._optimizer_ready:
                materialize_optimizer_state(leaf_optimizers(self.optimizer))
                self._optimizer_ready = True
            state["optim"] = self.optimizer.state_dict()
        return state

    # ---- saving ------------------------------------------------------------------------------
    def save(self, progress: Progress, sums: EpochSums, counter: Optional[SampleCounter], best: bool = False) -> None:
        entry = CheckpointEntry(
            name=CheckpointEntry.name_for(progress.epoch, progress.step),
            epoch=progress.epoch,
            step=progress.step,
            world_size=self.ctx.world_size,
            best=best,
            finished=progress.finished,
        )
        rank_state = {
            "rng": torch.get_rng_state(),
            # Dropout on GPU draws from the device's generator.
            "cuda_rng": torch.cuda.get_rng_state(self.ctx.device) if self.ctx.device.type == "cuda" else None,
            "loss": float(sums.loss),
            "steps": sums.steps,
            "samples": sums.samples,
            "counts": counter.counts.clone() if counter is not None else None,
            "batchnorm": self._batchnorm_buffers(),
        }
        train_state = {
            "epoch": progress.epoch,
            "step": progress.step,
            "lr": progress.lr,
            "lr_scale": progress.lr_scale,
            "finished": progress.finished,
            "stopper": dataclasses.asdict(progress.stopper),
            "history": progress.history,
            "objective_steps": self.objective.steps if self.objective is not None else 0,
            "world_size": self.ctx.world_size,
            "plan": self.plan_text,
            "config": self.cfg.to_dict(),
        }
        # The fault point names the epoch the checkpoint belongs to (1-based) and its step;
        # the epoch-end checkpoint of epoch E is (E, 0).
        fault_epoch, fault_step = (progress.epoch, 0) if progress.step == 0 else (progress.epoch + 1, progress.step)
        seconds = self.store.save(
            entry, self._app_state(), rank_state, train_state,
            before_commit=lambda: faults.maybe_crash("checkpoint", fault_epoch, fault_step, self.ctx.rank),
        )
        tags = ", ".join(t for t, on in (("best", best), ("final", progress.finished)) if on)
        self._log(f"checkpoint {self.root}/{entry.name} saved in {seconds:.1f}s" + (f" ({tags})" if tags else ""))

    def _batchnorm_buffers(self, live: bool = False) -> dict[str, torch.Tensor]:
        """BatchNorm running statistics. Each rank updates its own from its local batches during an
        epoch (they are averaged at epoch end), so mid-epoch they are per-rank state: the DCP copy
        holds rank 0's only."""
        out = {}
        for name, m in self.dmp.named_modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                for key in ("running_mean", "running_var", "num_batches_tracked"):
                    buf = getattr(m, key)
                    if buf is not None:
                        out[f"{name}.{key}"] = buf if live else buf.detach().cpu().clone()
        return out

    # ---- restoring ---------------------------------------------------------------------------
    def resume(self, progress: Progress, counter: Optional[SampleCounter]) -> Optional[EpochSums]:
        """Continue from the newest committed checkpoint (resume=auto); fills ``progress`` and
        returns the partial epoch sums, or None when starting from scratch."""
        if self.cfg.checkpoint.resume == "never":
            if self.store.latest() is not None:
                self._log(f"resume=never: discarding the checkpoints under {self.root}")
            self.store.reset()
            return None
        removed = self.store.clear_debris()
        if removed:
            self._log(f"removed uncommitted checkpoint folder(s) {', '.join(removed)} (a crash during a write)")
        entry = self.store.latest()
        if entry is None:
            return None
        state = self.store.train_state(entry)
        changed = changed_settings(state["config"], self.cfg.to_dict())
        if changed:
            raise ConfigError(
                f"{self.root} holds checkpoints of a run with other settings ({'; '.join(changed)}). "
                "Use the original settings to resume, another out=/checkpoint.root=, or checkpoint.resume=never"
            )
        same_world = entry.world_size == self.ctx.world_size
        if not same_world and entry.step != 0:
            raise ConfigError(
                f"checkpoint {self.root}/{entry.name} was taken mid-epoch by {entry.world_size} workers; this run "
                f"has {self.ctx.world_size}. Each worker's reader position only exists for the original world size: "
                f"resume with cluster.workers={entry.world_size}, or from an epoch-end checkpoint (step 0), "
                "which reshards to any number of workers"
            )
        app = self._app_state()
        self.store.load(entry, app)
        self.dmp.load_state_dict(app["model"])
        self.optimizer.load_state_dict(app["optim"])
        if state["lr_scale"] != 1.0:
            scale_lr(self.optimizer, state["lr_scale"], self.cfg.train.min_lr)
        if self.objective is not None:
            self.objective.steps = state["objective_steps"]
        progress.epoch, progress.step = state["epoch"], state["step"]
        progress.lr, progress.lr_scale, progress.finished = state["lr"], state["lr_scale"], state["finished"]
        progress.stopper = EarlyStopping(**state["stopper"])
        progress.history = state["history"]
        sums = EpochSums()
        if same_world:
            rank_state = self.store.rank_state(entry)
            torch.set_rng_state(rank_state["rng"])
            if rank_state.get("cuda_rng") is not None and self.ctx.device.type == "cuda":
                torch.cuda.set_rng_state(rank_state["cuda_rng"], self.ctx.device)
            sums = EpochSums(torch.tensor(rank_state["loss"], dtype=torch.float64), rank_state["steps"], rank_state["samples"])
            if counter is not None and rank_state["counts"] is not None:
                counter.counts.copy_(rank_state["counts"])
            with torch.no_grad():
                for name, buf in self._batchnorm_buffers(live=True).items():
                    buf.copy_(rank_state["batchnorm"][name])
            how = "same workers"
        else:
            how = f"resharded from {entry.world_size} to {self.ctx.world_size} workers; dropout RNG re-seeded"
            torch.manual_seed(self.cfg.train.seed + 1009 * entry.epoch + self.ctx.rank)  # CUDA too
        where = "finished run" if progress.finished else f"epoch {progress.epoch + 1}, after batch {progress.step}"
        self._log(f"resumed from {self.root}/{entry.name} ({where}; {how})")
        return sums

    def load_best(self) -> None:
        """Load the weights early stopping chose (the newest checkpoint marked best)."""
        entry = self.store.best()
        if entry is None:
            return
        app = self._app_state(with_optimizer=False)
        self.store.load(entry, app)
        self.dmp.load_state_dict(app["model"])
        self._log(f"loaded the best weights from {self.root}/{entry.name}")

    def warm_start(self, source: str) -> None:
        """Initialise every weight (tables, towers, BatchNorm statistics) from the best checkpoint
        of a finished run; the optimizer starts fresh. ``source`` is the run's OUT or its
        checkpoint root."""
        window = self.cfg.data.storage_retry_seconds
        store = CheckpointStore(source, self.ctx.rank, self.ctx.world_size, pg=self.store.pg, retry_seconds=window)
        if store.latest() is None:  # a run's OUT rather than its checkpoint root
            store = CheckpointStore(checkpoint_root(source, None), self.ctx.rank, self.ctx.world_size, pg=self.store.pg,
                                    retry_seconds=window)
        entry = store.best() or store.latest()
        if entry is None:
            raise ConfigError(f"checkpoint.warm_start={source!r}: no committed checkpoint there (no {INDEX})")
        app = self._app_state(with_optimizer=False)
        saved = store.tensor_shapes(entry)
        mismatched = []
        for key, value in app["model"].items():
            shape = tuple(value.size()) if hasattr(value, "size") else None
            if saved.get(f"model.{key}") != shape:
                mismatched.append(f"{key}: checkpoint {saved.get(f'model.{key}')} vs model {shape}")
        if mismatched:
            raise ConfigError(
                f"checkpoint.warm_start: {store.url}/{entry.name} does not fit this model "
                f"({len(mismatched)} tensors differ, e.g. {'; '.join(mismatched[:3])}). Warm starts need the same "
                "architecture and the same table sizes: prepare new partitions with hashed vocabularies "
                "(fixed buckets) or the same vocabulary sizes"
            )
        store.load(entry, app)
        self.dmp.load_state_dict(app["model"])
        self._log(f"warm start: weights from {store.url}/{entry.name}")
