"""Test setup: GPU-marked tests are skipped on machines without CUDA.

No ``__init__.py`` here and no path set-up: the tests import ``sae_kernels`` from wherever it
is installed, so they also check an installed copy (``.ci/kernels-alone``).
"""
import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip GPU-marked tests on machines without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
