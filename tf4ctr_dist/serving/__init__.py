"""Models leaving the system: the serving artifact, the single-device scorer, predict and serve.

    from tf4ctr_dist.serving import load
    scorer = load("model.tf4ctr")                 # TF4CTR on CPU, eval mode, weights loaded
    scorer.score({"user": ["u1", "u2"], ...})     # raw values -> probabilities (numpy, (n,))

Heavy imports (torch, torchrec) happen on first use, so `tf4ctr --help` stays fast.
"""

from __future__ import annotations

from typing import Any

__all__ = ["load", "export_run", "from_run"]


def load(path: str, precision: str | None = None) -> Any:
    """The artifact written by `tf4ctr export` as a `Scorer` (see serving.scorer); ``precision``
    (fp32 / bf16 / auto) overrides the run's model.inference_precision."""
    from tf4ctr_dist.serving.export import load as _load

    return _load(path, precision)


def export_run(run: str, out: str, storage_options: Any = None, block_bytes: int = 256 << 20) -> dict:
    """Write a finished run's artifact to ``out``, tables in row blocks of <= block_bytes."""
    from tf4ctr_dist.serving.export import export_run as _export

    return _export(run, out, storage_options, block_bytes)


def from_run(run: str, storage_options: Any = None, precision: str | None = None) -> Any:
    """A finished run's best weights as a `Scorer`; ``precision`` as for `load`."""
    from tf4ctr_dist.serving.export import from_run as _from_run

    return _from_run(run, storage_options, precision)
