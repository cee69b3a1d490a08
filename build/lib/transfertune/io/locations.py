"""Where the built-in model family and the built-in tasks live: package data inside the installed package,
or the directories named by TRANSFERTUNE_MODELS / TRANSFERTUNE_TASKS when set (never the working directory)."""
import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]


def builtin_models_dir() -> Path:
    return Path(os.environ.get("TRANSFERTUNE_MODELS", PACKAGE_DIR / "family" / "models"))


def builtin_tasks_dir() -> Path:
    return Path(os.environ.get("TRANSFERTUNE_TASKS", PACKAGE_DIR / "evaluation" / "builtin_tasks"))


def world_file() -> Path:
    """The fictional world the built-in family was pretrained on (people, attributes)."""
    return PACKAGE_DIR / "family" / "world" / "entities.json"
