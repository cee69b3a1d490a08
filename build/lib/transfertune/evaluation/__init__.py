"""Evaluation: built-in and user tasks, metrics, the baseline comparison behind `transfertune eval`, lm-eval."""
