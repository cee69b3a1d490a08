"""Label-set rewards (Portable Reward Tuning): a reward over a label set composed with any classifier of it."""
