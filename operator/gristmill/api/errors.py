"""How the API answers when something goes wrong: every error is JSON of one shape,
`{"error": MESSAGE}` (plus `"field"` when one field of the request is at fault), and
nothing escapes as an HTML page or a bare 500."""

from __future__ import annotations

import logging
import uuid

from aiohttp import web

from gristmill.api.access import Unauthenticated
from gristmill.api.database import DatabaseUnavailable
from gristmill.api.runs import RunError
from gristmill.auth.problems import ReviewUnavailable
from gristmill.flows.engine import FlowError
from gristmill.values import ValueProblem

log = logging.getLogger("gristmill.api")


def error_response(status: int, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    body: dict[str, str] = {"error": message}
    if field:
        body["field"] = field
    return web.json_response(body, status=status, headers=headers)


# What aiohttp's own refusals (unknown path, wrong method, oversize body) mean to a person.
_HTTP_MESSAGES = {
    404: "no such endpoint: the API's routes are listed in /api/v1/openapi.json",
    405: "method not allowed on this path (allowed: {allow})",
    413: "the request body is larger than {limit} bytes: send less",
}


def _from_http_exception(exc: web.HTTPException, body_limit: int) -> web.Response:
    template = _HTTP_MESSAGES.get(exc.status)
    headers = {}
    if exc.status == 405:
        headers["Allow"] = exc.headers.get("Allow", "")
    if template is None:
        message = exc.text if exc.text and not exc.text.startswith("<") else exc.reason
    else:
        message = template.format(allow=headers.get("Allow", ""), limit=body_limit)
    return error_response(exc.status, message, headers=headers or None)


def errors_middleware(body_limit: int):
    @web.middleware
    async def errors(request: web.Request, handler):
        try:
            return await handler(request)
        except (RunError, FlowError) as exc:
            return error_response(exc.status, exc.message, getattr(exc, "field", None),
                                  getattr(exc, "headers", None))
        except ValueProblem as exc:
            return error_response(400, exc.message, exc.where)
        except Unauthenticated as exc:
            return error_response(401, exc.message, headers={"WWW-Authenticate": exc.challenge})
        except (DatabaseUnavailable, ReviewUnavailable) as exc:
            return error_response(503, exc.message,
                                  headers={"Retry-After": str(exc.retry_after)})
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return _from_http_exception(exc, body_limit)
        except (ConnectionResetError, ConnectionAbortedError):
            raise  # the client went away; there is nobody to answer
        except Exception:
            reference = uuid.uuid4().hex[:12]
            log.exception("unexpected error answering %s %s (reference %s)",
                          request.method, request.path, reference)
            return error_response(500, f"internal error (reference {reference}, logged by the "
                                       f"API with its traceback): please report it")
    return errors
