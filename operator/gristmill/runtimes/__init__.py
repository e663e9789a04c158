"""Per-language runtimes: how a Script is wrapped, called, and its result read."""

from gristmill.runtimes.base import Runtime
from gristmill.runtimes.bash import BashRuntime
from gristmill.runtimes.python import PythonRuntime

RUNTIMES: dict[str, Runtime] = {"python": PythonRuntime(), "bash": BashRuntime()}


def get_runtime(language: str) -> Runtime:
    return RUNTIMES[language]
