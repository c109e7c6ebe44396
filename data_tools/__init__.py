"""Dataset preparation: converters (BARS CSV, Criteo), synthetic data, dataset checks.

Every tool writes the layout described in `tf4ctr_dist.data.manifest`: Parquet parts per split
plus `manifest.json`, written last and atomically (staging prefix, then move into place).
"""

from tf4ctr_dist.data.errors import DataError

__all__ = ["DataError"]
