"""Running one CEL program: its result as a JSON value, its failure in a person's words.

Run as `python -m gristmill.flows.cel_child`, this is also the child process
the evaluator sends expensive expressions to: it reads length-prefixed JSON
requests on stdin and answers on stdout, under an address-space limit, so a
runaway expression costs a killed child, never the process that serves
others. It imports only `cel` and `gristmill.values`, to start fast.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import datetime as dt
import functools
import json
import resource
import signal
import struct
import sys
from typing import Any, BinaryIO

import cel

from gristmill.values import ValueProblem, check_json

HEADER = struct.Struct(">I")
READY = b"\x01"
_PR_SET_PDEATHSIG = 1


class EvaluationFailed(Exception):
    """The expression ran and failed: a missing key, a type mismatch, a result JSON cannot
    hold. The message says why, without the expression (the caller names it)."""


def _json_value(value: Any, depth: int = 0) -> Any:
    """A CEL result as JSON: timestamps as RFC 3339 text, durations as "1.5s", bytes as
    base64 (the protobuf JSON mapping, which CEL's types come from)."""
    if depth > 200:
        raise EvaluationFailed("gave a value nested too deeply to store")
    if isinstance(value, dict):
        return {k if isinstance(k, str) else json.dumps(_json_value(k, depth + 1)):
                _json_value(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_value(v, depth + 1) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, dt.timedelta):
        return f"{value.total_seconds():g}s"
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, cel.OptionalValue):
        return _json_value(value.value(), depth + 1) if value.has_value() else None
    return str(value)  # a CEL type such as `type(1)`


@functools.lru_cache(maxsize=1024)
def _program(expression: str) -> cel.Program:
    return cel.compile(expression)


def run(program: cel.Program, context: dict[str, Any]) -> Any:
    """Execute and return a value PostgreSQL can store; EvaluationFailed otherwise."""
    try:
        value = program.execute(context)
    except KeyError as exc:
        raise EvaluationFailed(f"no such key {exc.args[0]!r} (a step that has not run, was "
                               f"skipped, or a missing field; test with has())") from None
    except RecursionError:
        raise EvaluationFailed("nests too deeply to evaluate") from None
    except MemoryError:
        raise
    except Exception as exc:  # the CEL runtime raises TypeError, ValueError, RuntimeError...
        raise EvaluationFailed(" ".join(str(exc).split())[:2000]) from None
    value = _json_value(value)
    try:
        check_json(value, "the result")
    except ValueProblem as exc:
        raise EvaluationFailed(f"gave a value that cannot be stored: {exc}") from None
    return value


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):  # not Linux: a closed stdin ends us
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _read_exactly(stream: BinaryIO, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = stream.read(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def serve(memory_bytes: int) -> None:
    _die_with_parent()
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    stdout.write(READY)
    stdout.flush()
    while True:
        header = _read_exactly(stdin, HEADER.size)
        if header is None:
            return  # the parent closed the pipe: it is done with us
        body = _read_exactly(stdin, HEADER.unpack(header)[0])
        if body is None:
            return
        try:
            request = json.loads(body)
            reply = {"value": run(_program(request["expression"]), request["context"])}
        except EvaluationFailed as exc:
            reply = {"error": str(exc)}
        except MemoryError:
            reply = {"error": "memory"}
        answer = json.dumps(reply, separators=(",", ":")).encode()
        stdout.write(HEADER.pack(len(answer)) + answer)
        stdout.flush()


if __name__ == "__main__":
    serve(int(sys.argv[1]))
