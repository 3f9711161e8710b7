"""pytest-benchmark entries over the installed suites (``sae_engine.benchmarks``): ``python -m pytest bench/ --benchmark-only``."""
