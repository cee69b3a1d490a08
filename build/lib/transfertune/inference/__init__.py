"""Inference: the composed model (loading, scoring), sampling rules, the cached decode loop, speculative decoding."""
