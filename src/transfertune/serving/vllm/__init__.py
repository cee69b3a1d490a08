"""Composed models inside vLLM: the plugin vLLM loads, the model class, the export, the launcher, and the logits
processor through which each request picks its own value models and beta."""
