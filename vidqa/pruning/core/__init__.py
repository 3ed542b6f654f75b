"""Pruning plumbing that method authors do not touch: presets, the pruner, decoder hooks, checks."""
