"""Tiny random checkpoints of every family and generated videos, for tests and benchmarks (no hub)."""
