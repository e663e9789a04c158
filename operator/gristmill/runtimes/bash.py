"""Bash: inputs as environment variables and positional arguments; the result is the last
stdout line that parses as JSON, else the whole stdout."""

from __future__ import annotations

import json
import re
from pathlib import Path

from gristmill.runtimes.base import WORK
from gristmill.sandbox.base import JobOutcome, JobRequest, failure

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _as_text(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value)


class BashRuntime:
    def prepare(self, request: JobRequest, workdir: Path, python: str) -> list[str]:
        (workdir / "main.sh").write_text(request.code)
        order = list(request.input_order) or list(request.input)
        return ["/bin/bash", f"{WORK}/main.sh",
                *(_as_text(request.input[name]) for name in order if name in request.input)]

    def env(self, request: JobRequest) -> dict[str, str]:
        return {name: _as_text(value) for name, value in request.input.items()
                if _ENV_NAME.match(name)}

    def outcome(self, request: JobRequest, workdir: Path, exit_code: int,
                stdout: str) -> JobOutcome:
        if exit_code != 0:
            return failure("exit", f"the script exited with code {exit_code}")
        for line in reversed(stdout.splitlines()):
            if line.strip():
                try:
                    return JobOutcome(ok=True, result=json.loads(line))
                except ValueError:
                    continue
        return JobOutcome(ok=True, result=stdout.strip())
