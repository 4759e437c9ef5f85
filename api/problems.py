"""RFC 9457 problem+json answers, one shape for every error a client sees."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.errors import MedtuneError

PROBLEM = "application/problem+json"
_UNPARSABLE_BODY = "There was an error parsing the body"  # fastapi.routing
DOCS = "https://medtune.dev/errors/"

# Pydantic error types mapped to stable codes a client can switch on.
_VALIDATION_CODES = {
    "extra_forbidden": "unknown_field",
    "missing": "missing_field",
    "json_invalid": "invalid_json",
    "greater_than": "out_of_range",
    "greater_than_equal": "out_of_range",
    "less_than": "out_of_range",
    "less_than_equal": "out_of_range",
    "too_short": "out_of_range",
    "too_long": "out_of_range",
    "string_too_short": "out_of_range",
    "string_too_long": "out_of_range",
    "int_type": "invalid_type",
    "float_type": "invalid_type",
    "literal_error": "invalid_choice",
    "enum": "invalid_choice",
    "needs_validation": "needs_validation",  # early stopping / keep best without eval losses
    "method_conflict": "method_conflict",  # a setting the job's training method cannot use
}


def problem(
    request: Request,
    *,
    status: int,
    code: str,
    title: str,
    detail: str,
    field: str | None = None,
    errors: list[dict[str, Any]] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": DOCS + code,
        "title": title,
        "status": status,
        "detail": detail,
        "instance": request.url.path,
        "code": code,
    }
    if field:
        body["field"] = field
    if errors:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, media_type=PROBLEM)


def field_path(loc: Sequence[int | str]) -> str:
    """A location as a client writes it: keys joined by dots, list items in brackets
    (``training_dataset.sources[1].weight``)."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def _field(err: dict[str, Any]) -> str:
    if err["type"] == "json_invalid":
        return "body"  # its location is a character offset, not a field
    return field_path([p for p in err["loc"] if p not in ("body", "query", "path")]) or "body"


def _fix(err: dict[str, Any]) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        return "remove this key; see the JobSpec schema at /docs for the accepted keys"
    if kind in ("int_type", "float_type"):
        what = "an integer" if kind == "int_type" else "a number"
        return f"{err['msg']}: send {what} as a JSON number, not a string or true/false"
    if kind == "json_invalid":
        offset = next((p for p in err["loc"] if isinstance(p, int)), None)
        where = f" (error at character {offset})" if offset is not None else ""
        return f"the body is not valid JSON{where}; send a JSON object"
    return err["msg"]


async def validation_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = [
        {
            "field": _field(e),
            "code": _VALIDATION_CODES.get(e["type"], "invalid_value"),
            "message": _fix(e),
        }
        for e in exc.errors()
    ]
    first = errors[0] if errors else {"field": "body", "code": "invalid_value", "message": ""}
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
    return problem(
        request,
        status=422,
        code=first["code"],
        title="Invalid request",
        detail=detail,
        field=first["field"],
        errors=errors,
    )


async def medtune_handler(request: Request, exc: MedtuneError) -> JSONResponse:
    return problem(
        request,
        status=exc.status,
        code=exc.code,
        # From the code, not the class: an error the worker raised is rebuilt on this side as a
        # plain MedtuneError, and one problem type must keep one title wherever it was raised.
        title=exc.code.replace("_", " ").capitalize(),
        detail=exc.detail,
        field=exc.field,
    )


async def http_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 400 and exc.detail == _UNPARSABLE_BODY:
        # FastAPI's answer to a body its parser cannot read (bytes that are not UTF-8 JSON, a
        # broken form): name the field and the fix, as the validation errors do.
        return problem(
            request,
            status=400,
            code="invalid_body",
            title="Invalid request",
            detail="the request body could not be parsed; send UTF-8 JSON with Content-Type: "
            "application/json (or multipart/form-data where the route takes a file)",
            field="body",
        )
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return problem(
        request, status=exc.status_code, code=code, title=str(exc.detail), detail=str(exc.detail)
    )


async def database_down_handler(request: Request, exc: OperationalError) -> JSONResponse:
    return problem(
        request,
        status=503,
        code="database_unavailable",
        title="Database unavailable",
        detail="the job store cannot be reached right now; retry shortly",
    )


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, validation_handler)  # type: ignore[arg-type]
    app.add_exception_handler(MedtuneError, medtune_handler)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, http_handler)  # type: ignore[arg-type]
    app.add_exception_handler(OperationalError, database_down_handler)  # type: ignore[arg-type]
