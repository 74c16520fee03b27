"""Benchmarks: ``python -m benchmarks.pretrain_speed --help``."""
