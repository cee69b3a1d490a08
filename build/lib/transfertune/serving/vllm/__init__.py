"""Composed models inside vLLM: the plugin vLLM loads, the model class, the export and the launcher."""
