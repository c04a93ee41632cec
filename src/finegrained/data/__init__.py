"""Phase 1 (CPU, once): dataset readers, manifests, crop geometry and decoding, shards, colour statistics, demo data."""
