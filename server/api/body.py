"""Request bodies decoded with messages that say what is wrong, before pydantic sees them.

FastAPI's own decoding answers "There was an error parsing the body" for invalid UTF-8 or JSON
nested past Python's recursion limit, and lets a lone UTF-16 surrogate (`"\\ud800"` is valid JSON)
through to the tokenizer, which cannot encode it. Every route with a body uses `CheckedRoute`:
an empty body names the required fields, bad bytes and too deep nesting are named as such, and a
surrogate is refused with the path of the field that holds it.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

from server.api.errors import BodyError

# A UTF-16 surrogate escape in JSON text. Bytes that decode as UTF-8 hold no surrogates, so only
# an escape can bring one in: a scan for unpaired ones decides whether the (slower) walk that
# names the field is needed. A false match (an escaped backslash before "ud800") only costs the
# walk, which then finds nothing.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _has_unpaired_surrogate_escape(text: str) -> bool:
    high_end = -1  # where the last high-surrogate escape ended, while it waits for its low half
    for match in _SURROGATE_ESCAPE.finditer(text):
        is_low = match.group()[3] in "cdefCDEF"
        if is_low and high_end != match.start():
            return True  # a low half without its high half just before
        if not is_low and high_end != -1:
            return True  # a high half whose low half did not follow
        high_end = -1 if is_low else match.end()
    return high_end != -1


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
        raise BodyError(400, "request body: JSON nested too deeply to parse") from None
    except json.JSONDecodeError:
        raise
    except ValueError as exc:  # e.g. an integer longer than Python's 4300-digit conversion limit
        raise BodyError(400, f"request body is not valid JSON: {exc}") from None
    if _has_unpaired_surrogate_escape(text):
        check_no_surrogates(value)
    return value


def check_no_surrogates(value: Any) -> None:
    """Refuse lone surrogates in strings or keys, naming the field. Iterative: the value may be deep."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            _check_text(item, f"{path or 'request body'}:", path or None)
            continue
        if not isinstance(item, (dict, list)):
            continue
        children = item.items() if isinstance(item, dict) else enumerate(item)
        for key, child in children:
            if isinstance(key, str):
                _check_text(key, f"{path or 'request body'}: a key", path or None)
            stack.append((child, f"{path}.{key}" if path else str(key)))


def _check_text(text: str, where: str, field: str | None) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        raise BodyError(400, f"{where} contains a lone UTF-16 surrogate (U+{code:04X}) at character "
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
