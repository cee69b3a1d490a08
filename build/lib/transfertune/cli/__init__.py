"""The `transfertune` command line: `main.py` maps each command to its own module (train.py, eval.py, ...) and
imports only the chosen one; `common.py` holds the flags several commands share."""
