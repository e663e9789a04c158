"""Python: import the Script, call main(**input), the return value is the JSON result.

A small wrapper does the calling inside the sandbox and writes the outcome on
the outcome pipe (runtimes/base.py); an exception is a failure carrying its
traceback (also printed: the log).
"""

from __future__ import annotations

import json
from pathlib import Path

from gristmill.runtimes.base import WORK, Report
from gristmill.runtimes.results import (
    MAX_MESSAGE_CHARS,
    MAX_TRACEBACK_CHARS,
    checked_result,
    clean_error,
    parse_lenient,
    too_large,
    too_large_message,
)
from gristmill.sandbox.base import MAX_RESULT_BYTES, JobOutcome, JobRequest, failure

WRAPPER = r'''
import json, os, sys
from importlib.util import module_from_spec, spec_from_file_location

OUT_FD = int(sys.argv[1])
os.set_inheritable(OUT_FD, False)  # programs the job starts do not get the outcome pipe
# Paths are relative to the work dir (the sandbox's /work), which is the cwd.
MAIN = os.path.abspath("main.py")
PID = os.getpid()

def finish(outcome):
    if os.getpid() != PID:
        os._exit(0)  # a process the job forked: only the job itself reports
    with os.fdopen(OUT_FD, "wb") as out:
        out.write(outcome)

def document(value):
    # Compact UTF-8, the measure of a result's size; a lone surrogate passes through for
    # the worker to name, as NaN and Infinity do.
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode(
        "utf-8", "surrogatepass")

def failed(kind, message, **extra):
    return document({"ok": False, "error": {"kind": kind, "message": message, **extra}})

def describe(exc):
    try:
        return f"{type(exc).__name__}: {exc}"[:MAX_MESSAGE]
    except Exception:  # an exception whose str() fails
        return type(exc).__name__

def run():
    with open(".gristmill/input.json") as f:
        args = json.load(f)
    sys.path.insert(0, os.path.dirname(MAIN))
    sys.argv = ["main.py"]
    try:
        spec = spec_from_file_location("__gristmill_main__", MAIN)
        module = module_from_spec(spec)
        spec.loader.exec_module(module)
        result = module.main(**args)
        if hasattr(result, "__await__"):  # async def main
            import asyncio
            result = asyncio.run(result)
    except MemoryError:
        finish(failed("memory", "out of memory (MemoryError): raise spec.resources.memory"))
        return
    except BaseException as exc:
        if isinstance(exc, SystemExit) and exc.code in (None, 0):
            result = None
        else:
            import traceback
            tb = exc.__traceback__
            while tb is not None and tb.tb_frame.f_code.co_filename != MAIN:
                tb = tb.tb_next  # drop the wrapper's own frames
            try:
                text = "".join(traceback.format_exception(type(exc), exc, tb))
            except Exception:
                text = describe(exc) + "\n"
            sys.stderr.write(text)
            message = describe(exc)
            if isinstance(exc, BlockingIOError):
                message += " (the process limit, spec.resources.maxProcesses, may have been hit)"
            if isinstance(exc, OSError) and exc.errno in (28, 122):  # ENOSPC, EDQUOT
                message += " (the job's disk, spec.resources.disk, may be full)"
            finish(failed("exception", message, traceback=text[-MAX_TRACEBACK:]))
            return
    try:
        payload = document({"ok": True, "result": result})
    except RecursionError:
        payload = failed("result", "main() returned a value nested too deeply to serialise: "
                                   "flatten it")
    except (TypeError, ValueError) as exc:
        payload = failed("result", f"main() returned {type(result).__name__}, which is not "
                                   f"JSON-serialisable: {describe(exc)}")
    if len(payload) > MAX_RESULT + 64:
        size = len(payload)
        amount = f"{size / 2**20:.1f} MiB of JSON"
        payload = failed("result", TOO_LARGE.replace("{amount}", amount))
    finish(payload)

run()
'''


def _wrapper() -> str:
    constants = (f"MAX_MESSAGE = {MAX_MESSAGE_CHARS}\nMAX_TRACEBACK = {MAX_TRACEBACK_CHARS}\n"
                 f"MAX_RESULT = {MAX_RESULT_BYTES}\n"
                 f"TOO_LARGE = {json.dumps(too_large_message('main() returned', '{amount}'))}\n")
    return constants + WRAPPER


class PythonRuntime:
    wrapper = _wrapper()

    def prepare(self, request: JobRequest, workdir: Path, python: str,
                outcome_fd: int) -> list[str]:
        (workdir / "main.py").write_text(request.code)
        control = workdir / ".gristmill"
        control.mkdir()
        (control / "input.json").write_text(json.dumps(request.input))
        (control / "run.py").write_text(self.wrapper)
        return [python, "-u", f"{WORK}/.gristmill/run.py", str(outcome_fd)]

    def env(self, request: JobRequest) -> dict[str, str]:
        return {"PYTHONDONTWRITEBYTECODE": "1"}

    def outcome(self, request: JobRequest, exit_code: int, stdout: str,
                report: Report) -> JobOutcome:
        if report.overflowed:
            return too_large("main() returned", at_least=report.cap)
        if not report.size:
            return failure("exit", f"the Python process exited with code {exit_code} before "
                                   f"main() returned")
        try:
            written = parse_lenient(report.data.decode("utf-8", "surrogatepass"))
        except ValueError:  # UnicodeDecodeError included
            written = None
        if not isinstance(written, dict):
            return failure("result", "the job's outcome report is garbled: code in the job "
                                     "wrote to the wrapper's outcome pipe")
        if written.get("ok") is True:
            return checked_result(written.get("result"), "main() returned")
        return JobOutcome(ok=False, error=clean_error(written.get("error")))
