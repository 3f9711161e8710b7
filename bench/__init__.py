"""Throughput and memory benchmarks (``python -m bench.table SUITE``, ``pytest bench/ --benchmark-only``)."""
