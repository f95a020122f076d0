"""Runnable examples that build their own data (the bundled files are under ``data/``)."""
