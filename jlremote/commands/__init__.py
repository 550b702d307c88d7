"""One module per command; each returns results.* dataclasses for cli.py to render."""
