"""Tensors and device helpers: the lowest layer, imported by models, pruning and the engine."""
