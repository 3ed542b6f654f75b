"""Frames from a video file: sampling rules per family (frame_rules.py) and decoding (decode.py)."""
