"""Serving the API until told to stop."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import http_exceptions, web

from gristmill.api.app import ApiSettings, create_app

log = logging.getLogger("gristmill.api")


class MalformedRequestFilter(logging.Filter):
    """aiohttp logs a request it cannot parse (a NUL in a header, a broken request line)
    with a traceback, as if it were our error; it is the client's, already answered 400:
    one line at INFO says so."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, http_exceptions.HttpProcessingError) and exc.code < 500:
            record.msg, record.args = "refused a malformed request: %s", (
                str(exc.message).strip().splitlines()[0] if exc.message else exc.code,)
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


async def serve(settings: ApiSettings | str, host: str, port: int, stop: asyncio.Event) -> None:
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, MalformedRequestFilter) for f in server_log.filters):
        server_log.addFilter(MalformedRequestFilter())
    runner = web.AppRunner(create_app(settings), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            raise OSError(f"cannot listen on {host}:{port} ({exc.strerror}); "
                          f"pick another with --port") from None
        log.info("API listening on http://%s:%d", host, port)
        await stop.wait()
    finally:
        await runner.cleanup()
