"""`vidqa batch`: a CSV of questions in, resumable JSONL/CSV records out (runner, store, summary, Ray)."""
