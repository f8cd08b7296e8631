"""Inference on trained runs: probability functions (ensembles, test-time augmentation), segmenting photos of
any size, export (StableHLO, ONNX) with model cards. Never imports training."""
