"""Dataset preparation: converters (Criteo, BARS CSV, MovieLens-1M, date-partitioned Parquet
logs), synthetic data, dataset checks.

Converters share one pipeline (data_tools.pipeline): counted or hashed vocabularies fit on train
(data_tools.vocab, data_tools.fields), run in this process or on Ray Data (data_tools.engine)
with byte-identical output. Every tool writes the layout described in
`tf4ctr_dist.data.manifest`: Parquet parts per split, the counted vocabularies (`vocab/`) and
`manifest.json`, written last and atomically (staging prefix, then move into place).
"""

from tf4ctr_dist.data.errors import DataError

__all__ = ["DataError"]
