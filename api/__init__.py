"""HTTP adapter: FastAPI routes over core. Never imports torch; enqueues work by task name."""
