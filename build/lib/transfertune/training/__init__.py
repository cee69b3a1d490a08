"""Training: the value-model trainer (a transformers.Trainer), plain SFT baselines, weight-diff transfer."""
