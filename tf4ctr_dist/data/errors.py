"""The one exception type for bad datasets, inputs and storage locations."""

from __future__ import annotations


class DataError(ValueError):
    """A dataset, input file or storage URL is missing, unreadable or malformed.

    Messages name the file or URL, the column, line or row group, and what was expected.
    They never contain credentials (see `tf4ctr_dist.data.storage.redact`).
    """
