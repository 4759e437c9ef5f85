"""The FastAPI application: ``uvicorn api.main:app``."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from api import problems
from api.admission import AdmissionLimit
from api.deps import install_security
from api.request_guards import RefuseNulBytes
from api.routes import (
    datasets,
    exports,
    files,
    health,
    infer,
    jobs,
    metrics,
    openai_chat,
    openai_files,
    openai_ft,
)
from core.logs import configure_from_env
from core.settings import get_settings

STATIC_DIR = Path(__file__).parent / "static"


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
    app.add_middleware(AdmissionLimit, limit=get_settings().api_max_inflight)
    app.add_middleware(RefuseNulBytes)  # outermost: Postgres text cannot hold NUL
    app.include_router(health.router)
    app.include_router(jobs.router)
    app.include_router(exports.router)
    app.include_router(infer.router)
    app.include_router(datasets.router)
    app.include_router(metrics.router)
    app.include_router(openai_ft.router)
    app.include_router(openai_chat.router)
    app.include_router(files.router)
    app.include_router(openai_files.router)
    # The dashboard: its page at / and its files under /static, so no API path is shadowed and
    # an unknown path is still a 404 problem.
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_api_route("/", dashboard, methods=["GET"], include_in_schema=False)
    return app


def dashboard() -> FileResponse:
    """The dashboard page (api/static/index.html)."""
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


app = create_app()
