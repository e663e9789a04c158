"""Transient failures (the database or the API server away) become kopf retries with an
exponential backoff; anything else stays an error, logged by kopf with its traceback."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from gristmill.sandbox.pod import api_trouble
from gristmill.store import connections

FIRST_DELAY_S, MAX_DELAY_S = 1.0, 60.0


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, ApiException) and exc.status == 409:  # a conflict: read, write again
        return True
    return api_trouble(exc) or connections.is_transient(exc)


def backoff_delay(retry: int) -> float:
    return min(MAX_DELAY_S, FIRST_DELAY_S * 2 ** retry)


def retried_when_transient(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(handler)
    async def wrapper(*args: Any, retry: int = 0, **kwargs: Any) -> Any:
        try:
            return await handler(*args, retry=retry, **kwargs)
        except Exception as exc:
            if not is_transient(exc):
                raise
            delay = backoff_delay(retry)
            raise kopf.TemporaryError(f"{type(exc).__name__}: {exc}; retrying in {delay:g}s",
                                      delay=delay) from exc
    return wrapper
