"""Shared pytest setup: hypothesis profile, thread count, and a `report` fixture whose lines are printed in the
terminal summary (so measured figures such as artifact size ratios appear in `make test` output). Works with
pytest-xdist: workers append to a file the controller reads at the end."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import settings

settings.register_profile("dbq", deadline=None, derandomize=True, max_examples=60)
settings.load_profile("dbq")

# One intra-op thread: on the 2-core CI box two OpenMP threads per process are 5-20x slower (contention).
torch.set_num_threads(1)

_ENV = "DBQ_TEST_REPORT_FILE"


def pytest_configure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput") and _ENV not in os.environ:
        fd, path = tempfile.mkstemp(prefix="dbq_test_report_", suffix=".txt")
        os.close(fd)
        os.environ[_ENV] = path


@pytest.fixture
def report():
    """Call ``report("text")`` to have a line printed in the pytest terminal summary."""

    def add(line: str) -> None:
        with open(os.environ[_ENV], "a", encoding="utf-8") as f:
            f.write(line.replace("\n", " ") + "\n")

    return add


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # noqa: ARG001
    path = os.environ.get(_ENV)
    if path and not hasattr(config, "workerinput") and Path(path).is_file():
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        if lines:
            terminalreporter.section("lightning_dbq measured figures")
            for line in sorted(lines):
                terminalreporter.write_line(line)
        Path(path).unlink()
