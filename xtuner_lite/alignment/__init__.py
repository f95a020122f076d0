"""Preference training: pair/unpaired losses, the objectives that train with them, and the
reference model's log-probabilities (live, adapter-disabled, or cached on disk)."""
