"""vidqa: ask a local video LLM about your videos, with training-free visual-token pruning."""

__version__ = "0.1.0"
