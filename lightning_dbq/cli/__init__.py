"""Hydra entry points (console scripts ``dbq-train``, ``dbq-search``). Thin: compose, validate, instantiate, run."""
