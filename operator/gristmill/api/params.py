"""What a request carries (its JSON body, path and query parameters), checked where it
enters: anything PostgreSQL or JSON cannot hold is a 400 naming the field, a body that
is not JSON a 415, never a 500 from deeper down."""

from __future__ import annotations

import datetime as dt
import re
import uuid
from typing import Any

from aiohttp import web

from gristmill.api.runs import RunError
from gristmill.spec.meta import ObjectMeta
from gristmill.values import ValueProblem, check_time, loads, text_problem

MAX_BODY_BYTES = 1024 * 1024
MAX_BATCH_BODY_BYTES = 4 * MAX_BODY_BYTES  # 1,000 runs of about 4 KiB each
MAX_SEQ = 2**63 - 1  # log sequence numbers are bigint
_BODY = "request body"

# Namespaces and names are Kubernetes object names; the pattern is the manifests' own.
_NAME_SCHEMA = ObjectMeta.model_json_schema()["properties"]["name"]
NAME_PATTERN: str = _NAME_SCHEMA["pattern"]
NAME_MAX_LENGTH: int = _NAME_SCHEMA["maxLength"]
_NAME = re.compile(NAME_PATTERN)

TRUE_WORDS = ("1", "true", "yes")
FALSE_WORDS = ("0", "false", "no", "")


def _shown(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def is_json_media(media: str) -> bool:
    return media == "application/json" or media.endswith("+json")


def _check_media_type(request: web.Request) -> None:
    if "Content-Type" not in request.headers:
        return  # curl without -H, and most scripts: take it as JSON
    media = request.content_type.lower()
    if not is_json_media(media):
        raise RunError(415, f"the request body must be JSON (Content-Type: application/json), "
                            f"not {_shown(media)}")
    charset = (request.charset or "utf-8").lower()
    if charset not in ("utf-8", "utf8"):
        raise RunError(415, f"charset {_shown(charset)} is not supported: send the body as "
                            f"UTF-8 (Content-Type: application/json; charset=utf-8)")


def too_large(limit: int) -> RunError:
    return RunError(413, f"the request body is larger than {limit} bytes: send less (a "
                         f"submit's input up to {MAX_BODY_BYTES // 1024} KiB, a batch's runs "
                         f"up to {MAX_BATCH_BODY_BYTES // 1024} KiB in all)")


async def json_body(request: web.Request, max_bytes: int = MAX_BODY_BYTES) -> dict[str, Any]:
    """The request's JSON object ({} when there is no body), every value checked; a 413
    past `max_bytes` (the route's limit; the app's client_max_size is the largest)."""
    if not request.body_exists:
        return {}
    _check_media_type(request)
    if request.content_length is not None and request.content_length > max_bytes:
        raise too_large(max_bytes)
    raw = await request.read()  # 413 past the app's client_max_size
    if len(raw) > max_bytes:
        raise too_large(max_bytes)
    if not raw.strip():
        return {}
    try:
        body = loads(raw, where=_BODY)
    except ValueProblem as exc:
        # Name the field as a client writes it: input.items[3], not request body.input...
        field = exc.where.removeprefix(_BODY + ".")
        raise ValueProblem(field, exc.reason) from None
    if not isinstance(body, dict):
        raise RunError(400, "the request body must be a JSON object such as {\"input\": {}}")
    return body


def check_fields(body: dict[str, Any], allowed: set[str]) -> None:
    unknown = set(body) - allowed
    if unknown:
        raise RunError(400, f"unknown field(s) {', '.join(sorted(map(_shown, unknown)))} in "
                            f"the request; expected {', '.join(sorted(allowed))}")


def is_name(value: str) -> bool:
    """Whether `value` is a Kubernetes object name (a namespace, a Script, a Flow)."""
    return len(value) <= NAME_MAX_LENGTH and _NAME.match(value) is not None


def name(request: web.Request, param: str) -> str:
    """A namespace or object name from the path."""
    value = request.match_info[param]
    if not is_name(value):
        raise RunError(400, f"{param} {_shown(value)} is not a valid name: lower-case letters, "
                            f"digits and '-', at most {NAME_MAX_LENGTH} characters, starting "
                            f"and ending with a letter or digit")
    return value


def run_id(request: web.Request) -> uuid.UUID:
    text = request.match_info["id"]
    try:
        return uuid.UUID(text)
    except ValueError:
        raise RunError(400, f"{_shown(text)} is not a run id (a UUID such as "
                            f"3f2b8c4e-1d2a-4b6e-9f10-2a3b4c5d6e7f)") from None


def query_flag(request: web.Request, param: str) -> bool:
    value = request.query.get(param, "").lower()
    if value in TRUE_WORDS:
        return True
    if value in FALSE_WORDS:
        return False
    raise RunError(400, f"{param} must be true or false (or 1 or 0), not {_shown(value)}")


def query_seq(request: web.Request, param: str) -> int:
    value = request.query.get(param, "0")
    if not value.isascii() or not value.isdigit() or len(value) > 19 or int(value) > MAX_SEQ:
        raise RunError(400, f"{param} must be a log sequence number (an integer from 0 to "
                            f"{MAX_SEQ}), not {_shown(value)}")
    return int(value)


def query_name(request: web.Request, param: str) -> str | None:
    value = request.query.get(param)
    if value is not None and not is_name(value):
        raise RunError(400, f"{param} {_shown(value)} is not a valid namespace name")
    return value


def text_field(body: dict[str, Any], field: str, max_length: int = 253) -> str | None:
    """An optional string field of the body."""
    value = body.get(field)
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > max_length:
        raise RunError(400, f"{field} must be a non-empty string of at most {max_length} "
                            f"characters")
    problem = text_problem(value)
    if problem:
        raise ValueProblem(field, problem)
    return value


def scheduled_for(body: dict[str, Any]) -> dt.datetime | None:
    if "scheduledFor" not in body:
        return None
    value = body["scheduledFor"]
    example = "2026-11-25T10:00:00Z"
    if not isinstance(value, str):
        raise ValueProblem("scheduledFor", f"must be an ISO 8601 time such as {example}")
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        raise ValueProblem("scheduledFor", f"{_shown(value)} is not an ISO 8601 time such as "
                                           f"{example}") from None
    return check_time(when, "scheduledFor")
