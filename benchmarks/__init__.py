"""Benchmarks (run from the repository root: python -m benchmarks.NAME --help). Not part of the installed package."""
