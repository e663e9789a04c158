"""What a job says about itself, made safe to store: its result checked, its error cleaned.

A result JSON or PostgreSQL cannot hold (NaN, Infinity, NUL, a lone
surrogate, nesting past values.MAX_DEPTH, more than MAX_RESULT_BYTES) fails
that one job with a message naming the value and what to return instead.
Error messages and tracebacks are only shown, so they are cleaned and cut to
size rather than refused. Everything here takes the job's word for nothing:
a job can write anything on its outcome pipe.
"""

from __future__ import annotations

import json
from typing import Any

from gristmill.sandbox.base import MAX_RESULT_BYTES, JobOutcome, failure
from gristmill.values import ValueProblem, check_json, clean_text

MAX_MESSAGE_CHARS = 2000
MAX_TRACEBACK_CHARS = 64 * 1024
ERROR_KINDS = {"exception", "exit", "timeout", "memory", "cpu", "output_limit", "killed",
               "cancelled", "setup", "result"}


def size_text(size: int) -> str:
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 1024:.0f} KiB"


def too_large_message(what: str, amount: str) -> str:
    return (f"{what} {amount}, and a result holds at most {size_text(MAX_RESULT_BYTES)}: store "
            f"large data elsewhere (a bucket, a database, a file share) and return a "
            f"reference to it")


def too_large(what: str, size: int | None = None, at_least: int | None = None) -> JobOutcome:
    """The failure of a result of `size` bytes, or of more than `at_least` (when the reader
    stopped keeping it)."""
    amount = (f"{size_text(size)} of JSON" if size is not None
              else f"more than {size_text(at_least or MAX_RESULT_BYTES)} of JSON")
    return failure("result", too_large_message(what, amount))


def checked_result(value: Any, what: str) -> JobOutcome:
    """`value` as the job's result, or the failure that says why it cannot be one. `what`
    starts the message: "main() returned", "the script's last JSON line is"."""
    try:
        check_json(value, "result")
    except ValueProblem as problem:
        return failure("result", f"{what} a value JSON cannot hold: {problem.message}")
    size = len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())
    if size > MAX_RESULT_BYTES:
        return too_large(what, size)
    return JobOutcome(ok=True, result=value)


def parse_lenient(text: str) -> Any:
    """JSON as Python's json reads it (NaN and Infinity included, so that checked_result can
    say where they are); ValueError when it is not JSON, or too deep to read."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply to read") from None


def clean_error(error: Any) -> dict[str, Any]:
    """A job's error report reduced to what Gristmill shows: a known kind, a message and a
    traceback, as clean text of bounded size."""
    if not isinstance(error, dict):
        error = {"message": error}
    kind = error.get("kind")
    cleaned: dict[str, Any] = {"kind": kind if kind in ERROR_KINDS else "exception",
                               "message": _text(error.get("message"), MAX_MESSAGE_CHARS)
                               or "failed without a message"}
    if error.get("traceback") is not None:
        cleaned["traceback"] = _text(error["traceback"], MAX_TRACEBACK_CHARS, keep_end=True)
    return cleaned


def _text(value: Any, limit: int, keep_end: bool = False) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        try:
            value = json.dumps(value)
        except (ValueError, RecursionError):
            value = f"({type(value).__name__})"
    text = clean_text(value)
    if len(text) <= limit:
        return text
    # A traceback's end says what happened; a message's start does.
    return "..." + text[-limit:] if keep_end else text[:limit] + "..."
