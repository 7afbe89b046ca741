"""Benchmarks behind ``python launch/bench.py SUITE``: each measures cpmjax and its best
alternative side by side in one process and appends JSON lines under ``bench/results/``."""
