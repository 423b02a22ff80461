"""API errors and how they are rendered: always `{"error": {"message", "type", "param", "code"}}`.

That is the OpenAI error shape; /generate uses it too so clients need one parser. Request
validation errors become 400s whose message names the offending field.
"""
from __future__ import annotations

import logging
import re
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)
_FIELD_PREFIX = re.compile(r"([a-z_][a-z0-9_.]*)(?: / [a-z_]+)*:")

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    408: "request_timeout",
    413: "request_too_large",
    429: "rate_limit_error",
    499: "client_closed_request",
    500: "server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """Raised anywhere below a route to answer with a given status and message."""

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers


class BodyError(StarletteHTTPException):
    """A request body refused before validation (size, time, encoding, shape), with the field at fault.

    An HTTPException, because FastAPI re-raises those from its body parsing as they are (any other
    exception there becomes a generic "There was an error parsing the body").
    """

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(status, message)
        self.param = param


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


def error_response(status: int, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


def error_body(status: int, message: str, param: str | None = None) -> dict:
    kind = _ERROR_TYPES.get(status) or _phrase(status)
    return {"error": {"message": printable(message), "type": kind, "param": printable(param), "code": status}}


def printable(text: str | None) -> str | None:
    """`text` with lone surrogates escaped: they cannot be encoded as UTF-8, and an error message
    that quotes the client's input must not turn its 400 into a 500."""
    if text is None:
        return None
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_")
    except ValueError:
        return "error"


def describe_validation_error(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable line per problem ("max_tokens: Input should be a valid integer"), and the first field."""
    described = [_describe(error) for error in exc.errors()]
    params = [param for _, param in described if param]
    return "; ".join(line for line, _ in described) or "invalid request", (params[0] if params else None)


def _describe(error: dict) -> tuple[str, str | None]:
    loc = [str(part) for part in error.get("loc", ()) if part != "body"]
    kind = error.get("type")
    if kind == "json_invalid":
        return f"request body is not valid JSON: {error.get('ctx', {}).get('error', error['msg'])}", None
    if kind == "extra_forbidden" and loc and not loc[-1]:
        loc[-1] = "''"  # an empty key still needs a name in the message
    field = ".".join(loc)
    if kind == "extra_forbidden":
        return f"{field}: unknown field", field
    message = error["msg"].removeprefix("Value error, ")
    if field:
        return f"{field}: {message}", field
    if kind == "model_attributes_type":
        return "request body must be a JSON object (and sent with Content-Type: application/json)", None
    named = _FIELD_PREFIX.match(message)  # a model-level check ("n: only n=1 is supported") names its field first
    return message, named.group(1) if named else None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = describe_validation_error(exc)
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), getattr(exc, "param", None),
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        # One failing request must not take others down: log it and answer 500 with the reason.
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")
