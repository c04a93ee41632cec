"""Phase 2: on-device augmentation, sharding, optimizer groups, pure step functions, the training loop, source pretraining."""
