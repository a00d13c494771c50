"""Experiment scripts: `python -m experiments.NAME --out DIR` (see the README)."""

import os

# OpenBLAS (under numpy, scipy and scikit-learn) keeps its worker threads spinning for
# about 0.1 s after each call. In a round-robin of candidates they then hold the cores
# while the next candidate is timed (in experiments/search_bench.py, jaxsim.topk ran at
# 0.70-0.76 of the raw matmul's rate with it, 0.84-0.86 without). The shortest timeout
# lets them sleep at once. OpenBLAS reads it when it loads, so it is set here, before any
# script imports numpy.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
