"""Keep worker output readable: TorchRec and fbgemm log every kernel argument at INFO."""

from __future__ import annotations

import logging
import warnings


class _DropPlannerNotes(logging.Filter):
    """TorchRec's planner logs "Sharding spec not found for <table>" on the root logger for every
    data-parallel table, which has no spec by design: one line per table per run, never news."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Sharding spec not found for ")


_PLANNER_FILTER = _DropPlannerNotes()


def quiet_library_logs() -> None:
    """Call before importing torchrec/fbgemm in a worker (their import itself logs)."""
    root = logging.getLogger()
    root.setLevel(logging.WARNING)
    if _PLANNER_FILTER not in root.filters:
        root.addFilter(_PLANNER_FILTER)
    for name in ("torchrec", "fbgemm_gpu", "torch.distributed", "torch.fx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*is_fx_tracing.*")
    # fbgemm's dense (data-parallel) lookup implements its backward inside the CPU op; autograd
    # warns about the missing Autograd-key registration although the gradient is exact
    # (tests/distributed/test_dense_tables.py compares it with plain torch).
    warnings.filterwarnings("ignore", message=".*dense_embedding_codegen_lookup_function.*")
