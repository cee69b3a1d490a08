"""`transfertune serve`: an OpenAI-compatible server for composed models (FastAPI + uvicorn, `pip install
transfertune[serve]`). `protocol.py` holds the OpenAI request schemas, `openai_serving.py` turns requests into
engine rows and responses, `app.py` holds the routes, errors and launch, `engine.py` batches requests
continuously in a `routed_batch.RoutedBatch` (each value model runs on the rows that chose it); the value models
are named in `value_registry.py`, the model ids requests pick in `model_table.py`, and `value_admin.py` loads and
unloads them at run time; `vllm/` runs composed models inside vLLM instead. Names are imported on first use, so
`serving.vllm` does not import fastapi."""
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transfertune.serving.app import create_app, serve
    from transfertune.serving.engine import Engine, Row

_EXPORTS = {"create_app": "app", "serve": "app", "Engine": "engine", "Row": "engine"}
__all__ = ["Engine", "Row", "create_app", "serve"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'transfertune.serving' has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f"transfertune.serving.{module}"), name)
