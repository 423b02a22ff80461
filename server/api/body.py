"""Request bodies decoded with messages that say what is wrong, before pydantic sees them.

FastAPI's own decoding answers "There was an error parsing the body" for invalid UTF-8 or JSON
nested past Python's recursion limit, and lets a lone UTF-16 surrogate (`"\\ud800"` is valid JSON)
through to the tokenizer, which cannot encode it. Every route with a body uses `CheckedRoute`:
an empty body names the required fields, bad bytes and deep nesting are named as such, and a
surrogate is refused with the path of the field that holds it.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

from server.api.errors import BodyError

MAX_JSON_DEPTH = 64  # requests here nest 4 deep (messages.0.content.0.text); 64 leaves room for tools


def decode_json(raw: bytes) -> Any:
    """Bytes -> a JSON value, or BodyError(400) naming the problem (json.JSONDecodeError for bad
    syntax, which FastAPI already reports with its position)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BodyError(400, f"request body is not valid UTF-8: byte 0x{raw[exc.start]:02x} at offset {exc.start}; "
                             "send JSON encoded as UTF-8") from None
    try:
        value = json.loads(text.removeprefix("\ufeff"))
    except RecursionError:
        raise BodyError(400, f"request body: JSON nested too deeply (at most {MAX_JSON_DEPTH} levels)") from None
    except json.JSONDecodeError:
        raise
    except ValueError as exc:  # e.g. an integer longer than Python's 4300-digit conversion limit
        raise BodyError(400, f"request body is not valid JSON: {exc}") from None
    check_json_value(value)
    return value


def check_json_value(value: Any) -> None:
    """Refuse nesting deeper than MAX_JSON_DEPTH and lone surrogates in strings or keys, naming the field.

    Iterative, so that the check itself cannot hit the recursion limit.
    """
    stack: list[tuple[Any, str, int]] = [(value, "", 1)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, str):
            _check_text(item, path or "request body", path or None)
            continue
        if not isinstance(item, (dict, list)):
            continue
        if depth > MAX_JSON_DEPTH:
            field = path.split(".")[0] or None  # the whole path would be dozens of indices long
            raise BodyError(400, f"{field or 'request body'}: JSON nested too deeply (at most {MAX_JSON_DEPTH} levels)",
                            field)
        children = item.items() if isinstance(item, dict) else enumerate(item)
        for key, child in children:
            if isinstance(key, str):
                _check_text(key, f"{path}: a key" if path else "a key", path or None)
            stack.append((child, f"{path}.{key}" if path else str(key), depth + 1))


def _check_text(text: str, where: str, field: str | None) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        raise BodyError(400, f"{where}: contains a lone UTF-16 surrogate (U+{code:04X}) at character "
                             f"{exc.start}, which is not valid Unicode text", field) from None


class CheckedJSONRequest(Request):
    """A request whose `json()` is `decode_json` (FastAPI calls `request.json()` for JSON bodies)."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = decode_json(await self.body())
        return self._json


class CheckedRoute(APIRoute):
    """An APIRoute whose JSON body goes through `decode_json`, and whose empty body is named as such."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        required = _required_fields(self)

        async def checked(request: Request) -> Response:
            request = CheckedJSONRequest(request.scope, request.receive)
            if self.body_field is not None and not (await request.body()).strip():
                fields = ", ".join(required) or "its fields"
                raise BodyError(400, f"request body is empty: send a JSON object with {fields} "
                                     "(Content-Type: application/json)", required[0] if required else None)
            return await handler(request)

        return checked


def _required_fields(route: APIRoute) -> list[str]:
    field_info = getattr(route.body_field, "field_info", None)
    fields = getattr(getattr(field_info, "annotation", None), "model_fields", {})
    return [name for name, info in fields.items() if info.is_required()]
