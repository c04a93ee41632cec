"""Reporting: tables (and later figures) read from the result files of finished runs."""
