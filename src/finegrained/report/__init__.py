"""Reporting: summary tables over seeds (tables), figures (figures, gallery), the throughput table (throughput)."""
