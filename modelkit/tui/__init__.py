"""``modelkit tui``: the Textual app over the library index (see app.py)."""
