"""Benchmark scripts, each run as `python bench/NAME.py` and printing its figures beside a
baseline measured in the same run; `bench/common.py` holds what they share."""
