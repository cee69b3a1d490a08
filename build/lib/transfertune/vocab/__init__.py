"""Token maps between vocabularies: they carry a value model to a base with another tokenizer (exact string
matches, or IVL's alignment over texts); io.fingerprint says whether two tokenizers share one."""
