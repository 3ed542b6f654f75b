"""Tensor operations several methods share: clustering, temporal segments, merging, budgets."""
