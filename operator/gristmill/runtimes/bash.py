"""Bash: inputs as environment variables and positional arguments; the result is the last
stdout line that parses as JSON, else the whole stdout."""

from __future__ import annotations

import json
import re
from pathlib import Path

from gristmill.runtimes.base import WORK, Report
from gristmill.runtimes.results import checked_result, parse_lenient, size_text
from gristmill.sandbox.base import MAX_RESULT_BYTES, JobOutcome, JobRequest, failure

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _as_text(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value)


class BashRuntime:
    def prepare(self, request: JobRequest, workdir: Path, python: str,
                outcome_fd: int) -> list[str]:
        (workdir / "main.sh").write_text(request.code)
        order = list(request.input_order) or list(request.input)
        return ["/bin/bash", f"{WORK}/main.sh",
                *(_as_text(request.input[name]) for name in order if name in request.input)]

    def env(self, request: JobRequest) -> dict[str, str]:
        return {name: _as_text(value) for name, value in request.input.items()
                if _ENV_NAME.match(name)}

    def outcome(self, request: JobRequest, exit_code: int, stdout: str,
                report: Report) -> JobOutcome:
        if exit_code != 0:
            return failure("exit", f"the script exited with code {exit_code}")
        for line in reversed(stdout.splitlines()):
            if line.strip():
                try:
                    value = parse_lenient(line)  # NaN too: refused below, with where it is
                except ValueError:
                    continue
                return checked_result(value, "the script's last JSON line is")
        text = stdout.strip()
        if len(text.encode()) > MAX_RESULT_BYTES:
            return failure("result", f"the script printed {size_text(len(text.encode()))} and "
                                     f"no JSON line, so all of it would be its result, which "
                                     f"holds at most {size_text(MAX_RESULT_BYTES)}: print the "
                                     f"result as JSON on the last line")
        return checked_result(text, "the script's output (its result: no line of it is JSON) "
                                    "is")
