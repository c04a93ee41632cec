"""Phase 3: the test split, read once per trained model: test-time views (views), metrics
(top-k, taxonomy levels, calibration, confusions; metrics), the evaluate job (job).
Importing this package is cheap: ``views`` and ``job`` import JAX, ``settings`` does not."""
