"""tf4ctr_dist: distributed TF4CTR training on TorchRec + Ray Train, streaming Parquet."""

__version__ = "0.1.0"
