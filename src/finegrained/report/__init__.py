"""Summaries, tables and figures of a run's results."""
