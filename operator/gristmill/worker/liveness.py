"""Is the worker making progress? The answer its liveness probe serves.

"The process is alive" says nothing: a worker whose claims fail forever, or
whose finished jobs never reach the database, heartbeats happily while its
jobs stay "running". Each loop reports its successes here; the probe fails
when one of them has not succeeded for `stall_after` seconds, so the kubelet
restarts a worker that cannot heal itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from aiohttp import web

log = logging.getLogger("gristmill.worker")


class Liveness:
    def __init__(self, stall_after: float, clock: Callable[[], float] = time.monotonic):
        self.stall_after = stall_after
        self.clock = clock
        started = clock()
        self._last_ok = {"claim": started, "heartbeat": started, "listen": started}
        self._last_error: dict[str, str] = {}
        self._listening = False
        self.claiming = True  # False while every slot is busy: no claims are due then
        self.oldest_unfinished: float | None = None  # when the oldest unwritten outcome came

    def ok(self, loop: str) -> None:
        self._last_ok[loop] = self.clock()
        self._last_error.pop(loop, None)

    def failed(self, loop: str, error: BaseException) -> None:
        self._last_error[loop] = f"{type(error).__name__}: {error}".strip()[:300]

    def listening(self, connected: bool) -> None:
        """The LISTEN connection is up, or went down (counted as stalled from then on)."""
        if connected or self._listening:
            self._last_ok["listen"] = self.clock()
        self._listening = connected

    def problems(self) -> list[str]:
        """What has stalled, in words; empty when the worker is live."""
        now = self.clock()
        found = []
        due = {"heartbeat": True, "claim": self.claiming, "listen": not self._listening}
        for loop, is_due in due.items():
            idle = now - self._last_ok[loop]
            if is_due and idle > self.stall_after:
                error = self._last_error.get(loop)
                found.append(f"no successful {loop} for {idle:.0f}s"
                             + (f" (last error: {error})" if error else ""))
        if self.oldest_unfinished is not None and now - self.oldest_unfinished > self.stall_after:
            found.append(f"finished jobs not written to the database for "
                         f"{now - self.oldest_unfinished:.0f}s")
        return found


async def serve_probe(liveness: Liveness, host: str, port: int) -> web.AppRunner:
    """GET /healthz: 200 while the worker makes progress, 503 with the reasons otherwise."""

    async def healthz(request: web.Request) -> web.Response:
        problems = liveness.problems()
        if problems:
            return web.json_response({"status": "stalled", "problems": problems}, status=503)
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    log.info("liveness probe on http://%s:%d/healthz", host, port)
    return runner
