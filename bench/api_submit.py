"""Submits through the HTTP API: round trips to PostgreSQL per submit, and what one API
process absorbs (single submits and batches), with the replicas a burst takes.

    python bench/api_submit.py [--seconds 10] [--clients 32] [--batches 100 1000]
                               [--pool-size 8] [--burst 100000 --burst-seconds 10]

Starts a throwaway PostgreSQL (the local server binaries, default durable settings:
fsync on, synchronous_commit on) and one `gristmill api` process (the real aiohttp app
and server, as `gristmill api` and the chart run it; local-token authentication, so no
Kubernetes review is in the path), with the examples applied, then:

1. round trips: the API reaches PostgreSQL through a proxy that delays every packet by
   --delay-ms each way; one client submits sequentially, and (latency with the proxy -
   latency without) / (2 x delay) is the number of round trips a submit waits for: a
   Script submit without and with an Idempotency-Key, a batch of 100, a Flow submit;
2. single submits: --clients concurrent clients (aiohttp, keep-alive) POST Script runs
   for --seconds; submits/s and latency p50/p99;
3. batches: the same clients POST batches of each --batches size; runs/s;
4. "replicas to absorb a burst of --burst runs in --burst-seconds s", from each rate.

The load generator shares the machine with the API and PostgreSQL (2 cores here): the
figures are a floor for a process with a core of its own. The last line is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp
import psycopg
from common import percentile, throwaway_postgres
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from gristmill.dev.manifests import apply_manifests

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-api-submit-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
SCRIPT = "/api/v1/namespaces/default/scripts/hello/runs"
FLOW = "/api/v1/namespaces/default/flows/process-orders/runs"
LATER = "2999-01-01T00:00:00Z"  # queued, never due: nothing claims the bench's runs


class DelayProxy:
    """A TCP proxy that delays every chunk by `delay` s each way (in order)."""

    def __init__(self, host: str, port: int, delay: float):
        self.target, self.delay = (host, port), delay
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server:
            self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            queue: asyncio.Queue = asyncio.Queue()

            async def deliver() -> None:
                while (item := await queue.get()) is not None:
                    at, data = item
                    await asyncio.sleep(max(0.0, at - time.monotonic()))
                    sink.write(data)
                    await sink.drain()
                sink.close()
            delivering = asyncio.ensure_future(deliver())
            try:
                while data := await source.read(65536):
                    queue.put_nowait((time.monotonic() + self.delay, data))
            except ConnectionError:
                pass
            queue.put_nowait(None)
            await delivering
        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer),
                             return_exceptions=True)


class Api:
    """`gristmill api` as a process of its own, on a free port."""

    def __init__(self, database_url: str, pool_size: int):
        self.database_url, self.pool_size = database_url, pool_size

    def __enter__(self) -> str:
        self.tmp = tempfile.TemporaryDirectory(prefix="gristmill-bench-api-")
        token_file = Path(self.tmp.name) / "token"
        token_file.write_text(TOKEN)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "GRISTMILL_LOG_LEVEL": "WARNING"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gristmill.cli", "api", "--database-url", self.database_url,
             "--host", "127.0.0.1", "--port", str(port), "--pool-size", str(self.pool_size),
             "--authentication", "token", "--token-file", str(token_file)], env=env)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert self.process.poll() is None, "gristmill api exited"
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=1):
                    return self.url
            except OSError:
                assert time.monotonic() < deadline, "gristmill api did not come up"
                time.sleep(0.1)

    def cpu_seconds(self) -> float:
        """User + system CPU the API process has used so far."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self.tmp.cleanup()


async def post(session: aiohttp.ClientSession, url: str, body: dict,
               headers: dict[str, str] | None = None) -> dict:
    async with session.post(url, data=json.dumps(body), headers=headers) as response:
        answer = await response.json()
        if response.status != 201:
            raise RuntimeError(f"{response.status}: {answer}")
        return answer


def batch_body(size: int, offset: int = 0) -> dict:
    return {"runs": [{"input": {"name": f"r{offset + i}"}, "scheduledFor": LATER}
                     for i in range(size)]}


async def sequential_latency(url: str, kind: str, repeats: int) -> float:
    """Median seconds of one submit of `kind`, one at a time."""
    async with aiohttp.ClientSession(headers=AUTH) as session:
        times = []
        for i in range(repeats + 3):
            if kind == "flow":
                path, body, headers = FLOW, {"input": {"batch": f"b{i}", "count": 1}}, None
            elif kind == "batch100":
                path, body, headers = SCRIPT + ":batch", batch_body(100, i * 100), None
            else:
                path, body = SCRIPT, {"input": {"name": f"s{i}"}, "scheduledFor": LATER}
                headers = {"Idempotency-Key": f"k-{time.time_ns()}"} if kind == "keyed" \
                    else None
            start = time.perf_counter()
            await post(session, url + path, body, headers)
            if i >= 3:  # the first ones warm the pool and the API's remembered versions
                times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]


async def round_trips(database_url: str, delay: float, repeats: int) -> dict[str, float]:
    kinds = ("script", "keyed", "batch100", "flow")
    with Api(database_url, 1) as url:  # one connection, as through the proxy
        plain = {kind: await sequential_latency(url, kind, repeats) for kind in kinds
                 if kind != "batch100" or await has_batches(url)}
    params = conninfo_to_dict(database_url)
    proxy = DelayProxy(params["host"], int(params["port"]), delay)
    params["port"] = str(await proxy.start())
    try:
        # The API runs in a child process; the proxy runs in this event loop while the
        # blocking Api() start waits in a thread.
        api = Api(make_conninfo(**params), 1)
        url = await asyncio.to_thread(api.__enter__)
        try:
            slowed = {kind: await sequential_latency(url, kind, repeats) for kind in plain}
        finally:
            await asyncio.to_thread(api.__exit__)
    finally:
        await proxy.stop()
    return {kind: round((slowed[kind] - plain[kind]) / (2 * delay), 1) for kind in plain}


async def has_batches(url: str) -> bool:
    """Whether this API has the batch endpoint (to measure an older one too)."""
    async with aiohttp.ClientSession(headers=AUTH) as session, session.post(
            url + SCRIPT + ":batch", data="{}") as response:
        return response.status != 404


async def load(url: str, clients: int, seconds: float, size: int | None
               ) -> tuple[float, float, float, int]:
    """(runs/s, p50 ms, p99 ms, requests) with `clients` concurrent clients for `seconds`;
    `size`: batches of that many runs, else single Script submits."""
    latencies: list[float] = []
    made = 0
    stop_at = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(headers=AUTH, connector=connector) as session:
        async def client(n: int) -> None:
            nonlocal made
            i = 0
            while time.monotonic() < stop_at:
                if size is None:
                    path, body = SCRIPT, {"input": {"name": f"c{n}-{i}"}, "scheduledFor": LATER}
                else:
                    path, body = SCRIPT + ":batch", batch_body(size, i * size)
                start = time.perf_counter()
                await post(session, url + path, body)
                latencies.append(time.perf_counter() - start)
                made += size or 1
                i += 1
        start = time.monotonic()
        await asyncio.gather(*(client(n) for n in range(clients)))
        elapsed = time.monotonic() - start
    return (made / elapsed, percentile(latencies, 50) * 1000, percentile(latencies, 99) * 1000,
            len(latencies))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--batches", type=int, nargs="*", default=[100, 1000])
    parser.add_argument("--pool-size", type=int, default=8)
    parser.add_argument("--delay-ms", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--burst", type=int, default=100_000)
    parser.add_argument("--burst-seconds", type=float, default=10.0)
    parser.add_argument("--skip-round-trips", action="store_true")
    args = parser.parse_args()

    async with throwaway_postgres("bench_api") as (_, database_url):
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            report = await apply_manifests(conn, [ROOT / "examples"])
            assert not report.errors, [str(e) for e in report.errors]
        result: dict = {"clients": args.clients, "pool_size": args.pool_size,
                        "seconds": args.seconds, "cpus": os.cpu_count()}
        if not args.skip_round_trips:
            trips = await round_trips(database_url, args.delay_ms / 1000, args.repeats)
            result["round_trips"] = trips
            print("round trips to PostgreSQL per request (measured through a "
                  f"{args.delay_ms:g} ms-each-way proxy):")
            for kind, label in (("script", "Script submit"),
                                ("keyed", "Script submit with Idempotency-Key"),
                                ("batch100", "batch of 100 Script runs"),
                                ("flow", "Flow submit (process-orders)")):
                if kind in trips:
                    print(f"  {label:38} {trips[kind]:5.1f}")

        target = args.burst / args.burst_seconds
        api = Api(database_url, args.pool_size)
        with api as url:
            await load(url, args.clients, 1.0, None)  # warm-up
            for size in [None, *args.batches]:
                clients = args.clients if size is None else min(args.clients, 8)
                cpu = api.cpu_seconds()
                rate, p50, p99, requests = await load(url, clients, args.seconds, size)
                cpu_ms = (api.cpu_seconds() - cpu) * 1000 / (requests * (size or 1))
                name = "single" if size is None else f"batch_{size}"
                result[name] = {"runs_per_s": round(rate), "p50_ms": round(p50, 1),
                                "p99_ms": round(p99, 1), "requests": requests,
                                "api_cpu_ms_per_run": round(cpu_ms, 3),
                                "replicas": math.ceil(target / rate)}
                what = "single submits" if size is None else f"batches of {size}"
                print(f"{what}, {clients} clients: {rate:,.0f} runs/s (p50 {p50:.1f} ms, "
                      f"p99 {p99:.1f} ms, {requests} requests; the API process used "
                      f"{cpu_ms:.2f} ms of CPU a run: {1000 / cpu_ms:,.0f} runs/s a core)")
        print(f"replicas to absorb a burst of {args.burst:,} runs in {args.burst_seconds:g} s "
              f"({target:,.0f} runs/s), at these per-process rates (if PostgreSQL keeps up):")
        for name in ["single", *(f"batch_{size}" for size in args.batches)]:
            print(f"  {name:12} {result[name]['replicas']}")
        print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
