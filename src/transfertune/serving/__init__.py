"""`transfertune serve`: an OpenAI-compatible server for composed models (FastAPI + uvicorn, `pip install
transfertune[serve]`). `engine.py` batches requests continuously; `app.py` holds the routes and schemas."""
from .app import create_app, serve
from .engine import Engine, Row

__all__ = ["Engine", "Row", "create_app", "serve"]
