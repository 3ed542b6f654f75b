"""The micro video LLM: a synthetic world (world), the model (model) and its training (train)."""
