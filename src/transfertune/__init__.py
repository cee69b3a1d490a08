"""transfertune: train a value model once against a small frozen base, compose it with any base at inference."""
__version__ = "0.1.0"
