"""Dataset preparation: converters (Criteo, BARS CSV, MovieLens-1M, date-partitioned Parquet
logs), synthetic data, dataset checks.

Converters share one pipeline (data_tools.pipeline): counted or hashed vocabularies fit on train
(data_tools.vocab, data_tools.fields), run in this process or on Ray Data (data_tools.engine)
with byte-identical output. Their options are typed (data_tools.options: shared write, vocabulary
and split groups plus each format's own keys), parsed from a flat spec with unknown keys refused.
Every tool writes the layout described in `tf4ctr_dist.data.manifest`: Parquet parts per split,
the counted vocabularies (`vocab/`) and `manifest.json`, written last and atomically (staging
prefix, then move into place).

Import direction: data_tools uses tf4ctr_dist.data (errors, manifest, storage, validate) only;
the library never imports data_tools (tests/unit/test_import_direction.py).
"""

from tf4ctr_dist.data.errors import DataError

from .options import (
    BarsCsvOptions,
    CriteoOptions,
    MovieLensOptions,
    OptionError,
    ParquetLogsOptions,
    SplitOptions,
    SyntheticOptions,
    VocabOptions,
    WriteOptions,
)

__all__ = [
    "DataError", "OptionError", "WriteOptions", "VocabOptions", "SplitOptions",
    "BarsCsvOptions", "CriteoOptions", "MovieLensOptions", "ParquetLogsOptions", "SyntheticOptions",
]
