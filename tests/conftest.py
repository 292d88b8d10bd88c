"""Shared pytest setup: hypothesis profile, thread count, and a `report` fixture whose lines are printed in the
terminal summary (so measured figures such as artifact size ratios appear in `make test` output)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import settings

settings.register_profile("dbq", deadline=None, derandomize=True, max_examples=60)
settings.load_profile("dbq")

# One intra-op thread: on the 2-core CI box two OpenMP threads per process are 5-20x slower (contention).
torch.set_num_threads(1)

_REPORT: list[str] = []


@pytest.fixture
def report():
    """Call ``report("text")`` to have a line printed in the pytest terminal summary."""
    return _REPORT.append


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # noqa: ARG001
    if _REPORT:
        terminalreporter.section("lightning_dbq measured figures")
        for line in _REPORT:
            terminalreporter.write_line(line)
