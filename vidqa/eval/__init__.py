"""Evaluation harness integrations. `lmms_model` plugs vidqa into lmms-eval (the optional
`eval` extra); nothing here is imported by the rest of vidqa, so vidqa works without lmms-eval."""
