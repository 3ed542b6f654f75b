"""What a person sees: the stats table and JSON record (report.py), the kept-token drawing (show_kept.py)."""
