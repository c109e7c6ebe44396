"""`python -m benchmarks`: the training benchmark (benchmarks/run.py)."""

from benchmarks.run import main

main()
