"""Metrics and the run report (named `evaluation` so that `transferkit.evaluate` stays the API function)."""
