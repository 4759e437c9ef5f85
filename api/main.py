"""The FastAPI application: ``uvicorn api.main:app``."""

from __future__ import annotations

from fastapi import FastAPI

from api import problems
from api.deps import install_security
from api.routes import datasets, health, infer, jobs, metrics, openai_ft
from core.logs import configure_from_env


def create_app() -> FastAPI:
    # MEDTUNE_LOG_FORMAT=json: uvicorn has set up its loggers by the time it imports the app.
    configure_from_env()
    app = FastAPI(
        title="medtune",
        version="0.1.0",
        description="Fine-tune chat LLMs on your own (medical) Q&A data with LoRA/QLoRA, "
        "watch them train, and ask the tuned model.",
    )
    problems.install(app)
    install_security(app)
    app.add_middleware(metrics.PrometheusMiddleware)
    app.include_router(health.router)
    app.include_router(jobs.router)
    app.include_router(infer.router)
    app.include_router(datasets.router)
    app.include_router(metrics.router)
    app.include_router(openai_ft.router)
    return app


app = create_app()
