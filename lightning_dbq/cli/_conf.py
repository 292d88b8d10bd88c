"""Locate the Hydra config directory: shipped in the wheel (``lightning_dbq/conf``) or the repo's ``conf/``."""

from __future__ import annotations

from pathlib import Path

__all__ = ["config_dir"]


def config_dir() -> str:
    """Absolute path of the config tree (wheel install first, then the source checkout)."""
    pkg = Path(__file__).resolve().parents[1]
    for candidate in (pkg / "conf", pkg.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"lightning_dbq: no Hydra config tree found next to {pkg}")
