"""The FastAPI application: ``uvicorn api.main:app``."""

from __future__ import annotations

from fastapi import FastAPI

from api import problems
from api.routes import health, infer, jobs


def create_app() -> FastAPI:
    app = FastAPI(
        title="medtune",
        version="0.1.0",
        description="Fine-tune chat LLMs on your own (medical) Q&A data with LoRA/QLoRA, "
        "watch them train, and ask the tuned model.",
    )
    problems.install(app)
    app.include_router(health.router)
    app.include_router(jobs.router)
    app.include_router(infer.router)
    return app


app = create_app()
