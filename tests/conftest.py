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

# The default kernel "auto" probes torch.compile. The suite tests every back-end explicitly; elsewhere "auto" is
# pinned to "fused" so that the suite's time and figures do not depend on this machine's compiler (set
# DBQ_KERNEL_AUTO="" to run the suite with the real probe).
os.environ.setdefault("DBQ_KERNEL_AUTO", "fused")

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


class GuardTrippedError(AssertionError):
    """An artifact load tried to reach the network or to unpickle something."""


def _tripwire(what: str):
    def trip(*args, **kwargs):
        raise GuardTrippedError(f"load_int tried to {what}")

    return trip


@pytest.fixture(autouse=True, scope="session")
def _artifact_loads_never_touch_network_or_pickle():
    """Every ``load_int`` in the suite runs with socket connects, pickle and ``torch.load`` made to raise."""
    import pickle
    import socket

    import lightning_dbq
    import lightning_dbq.quant
    import lightning_dbq.quant.artifact as artifact

    original = artifact.load_int
    guards = [
        (socket.socket, "connect", "open a network connection"),
        (socket.socket, "connect_ex", "open a network connection"),
        (socket, "create_connection", "open a network connection"),
        (pickle, "load", "unpickle"),
        (pickle, "loads", "unpickle"),
        (pickle, "Unpickler", "unpickle"),
        (torch, "load", "torch.load a file"),
    ]

    def guarded(*args, **kwargs):
        saved = [(obj, name, getattr(obj, name)) for obj, name, _ in guards]
        try:
            for obj, name, what in guards:
                setattr(obj, name, _tripwire(what))
            return original(*args, **kwargs)
        finally:
            for obj, name, value in saved:
                setattr(obj, name, value)

    for module in (artifact, lightning_dbq, lightning_dbq.quant):
        module.load_int = guarded
    yield
    for module in (artifact, lightning_dbq, lightning_dbq.quant):
        module.load_int = original
