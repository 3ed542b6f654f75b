"""Training-free visual-token pruning: tensor algorithms and model plumbing."""
