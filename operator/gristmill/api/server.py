"""Serving the API until told to stop."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from gristmill.api.app import ApiSettings, create_app

log = logging.getLogger("gristmill.api")


async def serve(settings: ApiSettings | str, host: str, port: int, stop: asyncio.Event) -> None:
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
