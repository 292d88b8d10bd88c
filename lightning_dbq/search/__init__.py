"""Sensitivity analysis and bit allocation (pure torch/numpy/pulp: no lightning, hydra or omegaconf)."""
