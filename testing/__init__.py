"""Tiny random-weight checkpoints of every family, for tests and benchmarks (no production module imports them)."""
