"""Callbacks: drop-in QAT, report (and, later, Hessian profiling, HASB, post-fit search)."""
