"""The command line: Typer commands that parse, call `vidqa.api`, and render (app.py is the entry)."""
