"""CEL evaluation with a budget: no expression can hold the event loop or a worker.

The CEL runtime (the Rust `cel` package) cannot be interrupted and holds the
GIL while it runs, and its `map` and `filter` are quadratic: a 4.9 KB input
and `flow_input.xs.map(a, flow_input.xs.map(b, a * b))` ran 67 s inside the
API's event loop. So each evaluation is either

- *inline*, when it is provably cheap: no macro (map, filter, all, exists,
  exists_one) and a small context, so its cost is at most the context's size
  times the references to it (at most `Budget.inline_units`, a few ms); or
- *guarded*: sent, from a thread, to a pre-started child process
  (`cel_child`) under an address-space limit, and that child is killed when
  the answer does not come within `Budget.seconds`. The caller's event loop
  is free meanwhile; a stopped expression fails its step only.

Neither CEL library for Python offers more: the Rust one has no cost limit
(cel-rust issue 56), and Google's C++ runtime (`cel-expr-python`) stops at a
fixed 10,000 comprehension iterations per evaluation, not settable from
Python, but bounds nothing within one iteration (9,000 iterations that each
concatenated 200 KB strings ran 3-6 s and took 1.8 GB) and holds the GIL too.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import json
import os
import select
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gristmill.flows import cel_child
from gristmill.spec.expressions import (
    CompiledExpression,
    ExpressionError,
    compile_expression,
    shown,
)


@dataclass(frozen=True)
class Budget:
    seconds: float = 1.0  # wall time of one guarded evaluation
    memory_bytes: int = 512 << 20  # address space of an evaluating child (the API pod: 512Mi)
    inline_units: int = 50_000  # context size x references that may run inline
    children: int = 4  # guarded evaluations at once, per process


DEFAULT_BUDGET = Budget()


def context_units(value: Any, limit: int) -> int:
    """The size of a JSON value in units (a node, or 256 characters of text), counted only
    up to `limit`: what it costs to hand the value to CEL once."""
    units = 0
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        units += 1
        if depth > 100:
            return limit + 1  # the runtime converts values recursively: guard deep ones
        if isinstance(item, str):
            units += len(item) // 256
        elif isinstance(item, dict):
            units += sum(len(k) for k in item) // 256
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
        if units > limit:
            return units
    return units


# The children import the same gristmill as this process, wherever it was imported from.
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])

# Children die with the thread that started them (PR_SET_PDEATHSIG is per thread), so they
# are started from this one thread, which lives as long as the process, never from an
# event loop's executor thread that goes away with its loop.
_SPAWNER = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cel-spawner")


class _Child:
    """One evaluating process, answering one request at a time."""

    def __init__(self, memory_bytes: int):
        path = os.pathsep.join(filter(None, [_PACKAGE_ROOT, os.environ.get("PYTHONPATH")]))
        self.process = _SPAWNER.submit(
            subprocess.Popen,
            [sys.executable, "-m", "gristmill.flows.cel_child", str(memory_bytes)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": path}).result()
        if self._read(1, time.monotonic() + 30) != cel_child.READY:
            self.kill()
            raise ExpressionError("the expression evaluator did not start")

    def _read(self, size: int, deadline: float) -> bytes | None:
        data = b""
        fd = self.process.stdout.fileno()
        while len(data) < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return None
            chunk = os.read(fd, size - len(data))
            if not chunk:
                return b""  # the child died (out of memory, crashed)
            data += chunk
        return data

    def ask(self, request: bytes, seconds: float) -> dict[str, Any] | str:
        """The child's answer, or "timeout" or "died"."""
        try:
            self.process.stdin.write(cel_child.HEADER.pack(len(request)) + request)
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            return "died"
        deadline = time.monotonic() + seconds
        header = self._read(cel_child.HEADER.size, deadline)
        if header is None:
            return "timeout"
        if not header:
            return "died"
        body = self._read(cel_child.HEADER.unpack(header)[0], deadline + 5)
        if not body:
            return "timeout" if body is None else "died"
        return json.loads(body)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            with contextlib.suppress(OSError):
                stream.close()


class Evaluator:
    """Evaluates compiled expressions within a Budget; one per process."""

    def __init__(self, budget: Budget = DEFAULT_BUDGET):
        self.budget = budget
        self._idle: list[_Child] = []
        self._started = 0
        self._lock = threading.Condition()
        atexit.register(self.close)

    def is_cheap(self, expression: CompiledExpression, context: dict[str, Any]) -> bool:
        analysis = expression.analysis
        if analysis.loops:
            return False
        limit = self.budget.inline_units // (analysis.references + 1)
        return context_units(context, limit) <= limit

    async def evaluate(self, expression: str | CompiledExpression, context: dict[str, Any],
                       seconds: float | None = None) -> Any:
        """The JSON value of `expression` in `context`; ExpressionError, naming the
        expression, when it fails or exceeds the budget (or `seconds`, when less)."""
        compiled = (compile_expression(expression) if isinstance(expression, str)
                    else expression)
        read = {name: context[name] for name in compiled.analysis.free_variables
                if name in context}  # what is not read costs nothing to convert
        if self.is_cheap(compiled, read):
            return self.evaluate_inline(compiled, read)
        return await asyncio.to_thread(self.evaluate_guarded, compiled, read, seconds)

    def evaluate_inline(self, compiled: CompiledExpression, context: dict[str, Any]) -> Any:
        try:
            return cel_child.run(compiled.program, context)
        except cel_child.EvaluationFailed as exc:
            raise ExpressionError(f"{shown(compiled.source)}: {exc}") from None

    def evaluate_guarded(self, compiled: CompiledExpression, context: dict[str, Any],
                         seconds: float | None = None) -> Any:
        """Blocking: evaluate in a child process, killed past the budget (call from a
        thread)."""
        seconds = self.budget.seconds if seconds is None else min(seconds, self.budget.seconds)
        request = json.dumps({"expression": compiled.source, "context": context},
                             separators=(",", ":"), default=str).encode()
        child = self._checkout()
        answer = child.ask(request, seconds)
        if isinstance(answer, dict) and answer.get("error") != "memory":
            self._checkin(child)  # a child that ran out of memory may be half broken
        else:
            self._discard(child)
        budget = (f"the budget of one evaluation is {self.budget.seconds:g} s and "
                  f"{self.budget.memory_bytes >> 20} MiB")
        if answer == "timeout":
            raise ExpressionError(
                f"{shown(compiled.source)} was stopped after {seconds:.3g} s: "
                f"{budget}. A macro (map, filter, all, exists) over a long list, or one "
                f"nested in another, costs that much; do such work in a Script step")
        if answer == "died" or answer.get("error") == "memory":
            raise ExpressionError(f"{shown(compiled.source)} was stopped: it needed more than "
                                  f"{self.budget.memory_bytes >> 20} MiB of memory ({budget}); "
                                  f"do such work in a Script step")
        if "error" in answer:
            raise ExpressionError(f"{shown(compiled.source)}: {answer['error']}")
        return answer["value"]

    def _checkout(self) -> _Child:
        with self._lock:
            while True:
                while self._idle and self._idle[-1].process.poll() is not None:
                    self._idle.pop().kill()  # died while idle (killed from outside)
                    self._started -= 1
                if self._idle:
                    return self._idle.pop()
                if self._started < self.budget.children:
                    break
                self._lock.wait()
            self._started += 1
        try:
            return _Child(self.budget.memory_bytes)
        except BaseException:
            with self._lock:
                self._started -= 1
                self._lock.notify()
            raise

    def _checkin(self, child: _Child) -> None:
        with self._lock:
            self._idle.append(child)
            self._lock.notify()

    def _discard(self, child: _Child) -> None:
        child.kill()
        with self._lock:
            self._started -= 1
            self._lock.notify()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
            self._started -= len(idle)
        for child in idle:
            child.kill()


evaluator = Evaluator()
