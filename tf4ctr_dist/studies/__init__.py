"""Studies: multi-seed statistics, per-run analyses for the paper's figures, plots, sweeps.

Imports nothing heavy at package level: the CLI imports its command modules to build ``--help``.
"""
