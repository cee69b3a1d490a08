"""The `transfertune` command line: `main.py` maps each command to its own module and imports only that one."""
from transfertune.cli.main import main

__all__ = ["main"]
