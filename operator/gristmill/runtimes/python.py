"""Python: import the Script, call main(**input), the return value is the JSON result.

A small wrapper does the calling inside the sandbox and writes the outcome to a
file; an exception is a failure carrying its traceback (also printed: the log).
"""

from __future__ import annotations

import json
from pathlib import Path

from gristmill.runtimes.base import WORK
from gristmill.sandbox.base import JobOutcome, JobRequest, failure

WRAPPER = r'''
import json, os, sys
from importlib.util import module_from_spec, spec_from_file_location

# Paths are relative to the work dir (the sandbox's /work), which is the cwd.
OUT = os.path.abspath(".gristmill/outcome.json")
MAIN = os.path.abspath("main.py")
PID = os.getpid()

def finish(outcome):
    if os.getpid() != PID:
        os._exit(0)  # a process the job forked: only the job itself reports
    with open(OUT + ".tmp", "w") as f:
        f.write(outcome)
    os.rename(OUT + ".tmp", OUT)

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
        finish(json.dumps({"ok": False, "error": {
            "kind": "memory", "message": "out of memory (MemoryError): raise spec.resources.memory"}}))
        return
    except BaseException as exc:
        if isinstance(exc, SystemExit) and exc.code in (None, 0):
            result = None
        else:
            import traceback
            tb = exc.__traceback__
            while tb is not None and tb.tb_frame.f_code.co_filename != MAIN:
                tb = tb.tb_next  # drop the wrapper's own frames
            text = "".join(traceback.format_exception(type(exc), exc, tb))
            sys.stderr.write(text)
            message = f"{type(exc).__name__}: {exc}"[:2000]
            if isinstance(exc, BlockingIOError):
                message += " (the process limit, spec.resources.maxProcesses, may have been hit)"
            finish(json.dumps({"ok": False, "error": {
                "kind": "exception", "message": message, "traceback": text}}))
            return
    try:
        payload = json.dumps({"ok": True, "result": result})
    except (TypeError, ValueError) as exc:
        payload = json.dumps({"ok": False, "error": {
            "kind": "result", "message": f"main() returned {type(result).__name__}, which is not "
                                         f"JSON-serialisable: {exc}"}})
    finish(payload)

run()
'''


class PythonRuntime:
    def prepare(self, request: JobRequest, workdir: Path, python: str) -> list[str]:
        (workdir / "main.py").write_text(request.code)
        control = workdir / ".gristmill"
        control.mkdir()
        (control / "input.json").write_text(json.dumps(request.input))
        (control / "run.py").write_text(WRAPPER)
        return [python, "-u", f"{WORK}/.gristmill/run.py"]

    def env(self, request: JobRequest) -> dict[str, str]:
        return {"PYTHONDONTWRITEBYTECODE": "1"}

    def outcome(self, request: JobRequest, workdir: Path, exit_code: int,
                stdout: str) -> JobOutcome:
        try:
            written = json.loads((workdir / ".gristmill" / "outcome.json").read_text())
        except (OSError, ValueError):
            return failure("exit", f"the Python process exited with code {exit_code} before "
                                   f"main() returned")
        if written.get("ok"):
            return JobOutcome(ok=True, result=written.get("result"))
        return JobOutcome(ok=False, error=written.get("error"))
