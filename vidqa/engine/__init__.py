"""One request end to end (request.py), a video asked many questions (session.py), and what they measure (stats.py)."""
