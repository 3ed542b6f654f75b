"""Training-free visual-token pruning (docs/design.md, "Layers").

core/     the plumbing method authors do not touch: presets, the pruner, decoder hooks, checks
ops/      tensor operations several methods share
methods/  one file per published method: its stages and its algorithm
"""
