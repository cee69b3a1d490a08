"""Loading and unloading value models while the server runs (/v1/load_value, /v1/unload_value).

Loading reads the directory on a worker thread (decoding goes on), refuses it with the reason when it is not a
value directory, when its vocabulary is not the base's and the server composes no token map, or when it attends
over fewer tokens than the server's max_model_len; then, between two decoding steps, runs it once on a dummy
batch (as at start-up: caches rows can join and leave) before requests may pick it.

Unloading marks the value model: new requests for it get a 409 at once, rows already running or waiting finish
as usual; once none is left (checked between steps, on the engine thread), it leaves the registry, and with its
last row its group's KV cache left the batch. The request answers when it is gone.
"""
from __future__ import annotations

import asyncio
from functools import partial

from transfertune.io.loading import context_length
from transfertune.io.validate import InputError
from transfertune.serving.engine import Engine, Overloaded
from transfertune.serving.protocol import APIError, LoadValueRequest, UnloadValueRequest
from transfertune.serving.value_registry import check_value_name

POLL_SECONDS = 0.05


async def load_value(server, body: LoadValueRequest) -> dict:
    try:
        name = check_value_name(body.name, "name")
    except InputError as err:
        raise APIError(400, str(err), param="name") from None
    try:
        served = await asyncio.to_thread(server.registry.load, name, body.path)
    except InputError as err:  # ValueLoadError, a name taken meanwhile
        raise APIError(400, str(err), param="path", code="invalid_value_model") from None
    try:
        window = context_length(served.module) or context_length(getattr(served.module, "model", None))
        if window and window < server.max_model_len:
            raise ValueError(f"value model {body.path} attends over {window} tokens, fewer than this server's "
                             f"max_model_len ({server.max_model_len})")
        await server.engine.run_job(partial(server.engine.check_batching, (name,)))
        served.ready = True
    except (ValueError, Overloaded) as err:
        server.registry.remove(name)
        raise APIError(400 if isinstance(err, ValueError) else 429, f"value model {name!r} not loaded: {err}",
                       param="path", code="invalid_value_model") from None
    server.models.forget_templates()
    return {"object": "value_model", "id": server.models.value_id(name), "name": name, "path": body.path,
            "beta": served.beta, "loaded": True}


async def unload_value(server, body: UnloadValueRequest) -> dict:
    served = server.registry.get(body.name)
    if served is None:
        raise APIError(404, f"no value model named `{body.name}` is loaded; loaded: "
                            f"{', '.join(server.registry.names()) or 'none'}", param="name", code="model_not_found")
    server.registry.mark_unloading(body.name)
    while not await _remove_when_unused(server.engine, body.name):
        await asyncio.sleep(POLL_SECONDS)
    server.models.forget_templates()
    return {"object": "value_model", "id": server.models.value_id(body.name), "name": body.name, "loaded": False}


async def _remove_when_unused(engine: Engine, name: str) -> bool:
    def remove() -> bool:
        if engine.uses(name):
            return False
        engine.registry.remove(name)
        return True

    try:
        return await engine.run_job(remove)
    except Overloaded:  # the queue is full: try again at the next poll
        return False
