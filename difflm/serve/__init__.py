"""`difflm serve`: an OpenAI-compatible HTTP server with dynamic batching (`engine`), its FastAPI app (`app`)
and the chat page (`static/`). The engine needs only torch; the app needs the `serve` extra (fastapi, uvicorn)."""

from difflm.serve.engine import Engine, EngineStats, Job, QueueFull, ShuttingDown

__all__ = ["Engine", "EngineStats", "Job", "QueueFull", "ShuttingDown"]
