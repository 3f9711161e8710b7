"""pytest-benchmark runs name the CPU with its vector/matrix features, as every suite's output does."""
from __future__ import annotations

from typing import Any

import pytest

from sae_engine.training.precision import resolve_precision
from sae_kernels.hardware import cpu_info


def pytest_report_header(config: pytest.Config) -> str:
    return f"cpu: {cpu_info().describe()}; precision auto on the CPU: {resolve_precision('auto', 'cpu').dtype}"


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict[str, Any]) -> None:
    """Stored in every saved benchmark JSON beside pytest-benchmark's own machine fields."""
    cpu = cpu_info()
    machine_info["cpu_described"] = cpu.describe()
    machine_info["cpu_features"] = cpu.features
