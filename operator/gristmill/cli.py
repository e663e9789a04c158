"""The `gristmill` command: dev, run, runs, get, logs, cancel, audit, worker, api, migrate,
apply."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from gristmill.client import SUBMIT_RETRY_S, ApiError, Client, default_server


class UsageError(Exception):
    """A mistake on the command line: printed as one line, exit code 2."""


def _database_url(args: argparse.Namespace) -> str:
    url = args.database_url or os.environ.get("GRISTMILL_DATABASE_URL")
    if not url:
        raise UsageError("no database: pass --database-url or set GRISTMILL_DATABASE_URL "
                         "(e.g. postgresql://user:pass@host:5432/gristmill)")
    return url


def _read_input(args: argparse.Namespace) -> dict[str, Any]:
    if args.input is not None and args.input_file is not None:
        raise UsageError("give --input or --input-file, not both")
    if args.input_file is not None:
        try:
            text = Path(args.input_file).read_text() if args.input_file != "-" else sys.stdin.read()
        except OSError as exc:
            raise UsageError(f"cannot read --input-file {args.input_file}: {exc.strerror}") from exc
        source = args.input_file
    else:
        text, source = args.input or "{}", "--input"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{source} is not valid JSON ({exc.msg} at line {exc.lineno} column "
                         f"{exc.colno}); pass an object such as '{{\"name\": \"world\"}}'") from exc
    if not isinstance(value, dict):
        raise UsageError(f"{source} must be a JSON object such as '{{\"name\": \"world\"}}'")
    return value


def _client(args: argparse.Namespace) -> Client:
    """A client of --server that sends the caller's credentials (gristmill.credentials)."""
    from gristmill.credentials import resolve

    credentials = resolve(args.server, args.token, os.environ)
    return Client(args.server, token=credentials.token, token_source=credentials.source)


def _labels(pairs: list[str]) -> dict[str, str]:
    """--label KEY=VALUE, repeated (the server checks the syntax)."""
    labels = {}
    for pair in pairs:
        key, equals, value = pair.partition("=")
        if not equals:
            raise UsageError(f"--label {pair!r} is not KEY=VALUE, e.g. --label team=payments")
        labels[key] = value
    return labels


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=False))


def _report_failure(client: Client, run: dict[str, Any]) -> int:
    error = run.get("error") or {}
    print(f"run {run['id']} {run['status']}: {error.get('message', 'no error message')}",
          file=sys.stderr)
    tail = client.log_tail(run["id"])
    if tail:
        print("--- last lines of the log ---", file=sys.stderr)
        print(tail, file=sys.stderr)
    return 1


BATCH_SIZE = 1000  # the API's most runs in one batch request


def _read_batch(args: argparse.Namespace) -> list[dict[str, Any]]:
    """--batch FILE: a JSON array of run bodies, or JSON Lines (one body a line)."""
    if args.input is not None or args.input_file is not None or args.wait:
        raise UsageError("--batch takes each run's input from FILE: leave out --input, "
                         "--input-file and --wait")
    try:
        text = Path(args.batch).read_text() if args.batch != "-" else sys.stdin.read()
    except OSError as exc:
        raise UsageError(f"cannot read --batch {args.batch}: {exc.strerror}") from exc
    try:
        value = json.loads(text) if text.lstrip().startswith("[") else [
            json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise UsageError(f"--batch {args.batch} is neither a JSON array nor JSON Lines "
                         f"({exc.msg} at line {exc.lineno}); write one run a line, such as "
                         f"{{\"input\": {{\"name\": \"world\"}}}}") from exc
    if not value or not all(isinstance(entry, dict) for entry in value):
        raise UsageError(f"--batch {args.batch} must hold runs, each a JSON object such as "
                         f"{{\"input\": {{\"name\": \"world\"}}, \"priority\": 5}}")
    return value


def _run_batch(args: argparse.Namespace, client: Client) -> int:
    """Submit --batch FILE's runs, 1,000 a request (each request all or none); --priority
    and --label apply to the runs that do not say their own."""
    entries = _read_batch(args)
    for entry in entries:
        if args.priority is not None:
            entry.setdefault("priority", args.priority)
        if args.label:
            entry["labels"] = {**_labels(args.label), **entry.get("labels", {})}
    made: list[dict[str, Any]] = []
    for start in range(0, len(entries), BATCH_SIZE):
        try:
            answer = client.submit(
                f"{args.what}s", args.namespace, args.name,
                {"runs": entries[start:start + BATCH_SIZE]}, retry_for=SUBMIT_RETRY_S,
                on_retry=lambda note: print(f"gristmill: {note}", file=sys.stderr), batch=True)
        except ApiError:
            if made:  # the runs before this request were made: say which
                end = min(start + BATCH_SIZE, len(entries))
                print(f"gristmill: runs 1 to {len(made)} of {len(entries)} were submitted "
                      f"(their ids follow); the request of runs {start + 1} to {end} made "
                      f"none (its runs[N] is run {start + 1}+N)", file=sys.stderr)
                _print_ids_or_json(args, made)
            raise
        made.extend(answer["runs"])
    _print_ids_or_json(args, made)
    return 0


def _print_ids_or_json(args: argparse.Namespace, runs: list[dict[str, Any]]) -> None:
    if args.output == "json":
        _print_json(runs)
    else:
        for run in runs:
            print(run["id"])


def cmd_run(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.batch is not None:
        return _run_batch(args, client)
    body: dict[str, Any] = {"input": _read_input(args)}
    if args.priority is not None:
        body["priority"] = args.priority
    if args.label:
        body["labels"] = _labels(args.label)
    # A fresh Idempotency-Key for this invocation: a submit retried after a dropped
    # connection or a 503 is the same request to the server, never a second run.
    submitted = client.submit(f"{args.what}s", args.namespace, args.name, body,
                              retry_for=SUBMIT_RETRY_S,
                              on_retry=lambda note: print(f"gristmill: {note}", file=sys.stderr))
    if not args.wait:
        if args.output == "json":
            _print_json(submitted)
        else:
            print(submitted["id"])
        return 0
    run = client.wait(submitted["id"], timeout=args.timeout)
    if args.output == "json":
        _print_json(run)
        return 0 if run["status"] == "succeeded" else 1
    if run["status"] != "succeeded":
        return _report_failure(client, run)
    _print_json(run["result"])
    return 0


def _print_steps(steps: list[dict[str, Any]], depth: int = 0) -> None:
    shown = steps if len(steps) <= 20 else steps[:10]
    for step in shown:
        duration = f"{step['durationMs']:.0f} ms" if step["durationMs"] is not None else ""
        attempts = f"x{step['attempts']}" if (step["attempts"] or 0) > 1 else ""
        print(f"{'  ' * depth}{step['path']:<{max(28 - 2 * depth, 8)}} {step['status']:<10} "
              f"{duration:>10} {attempts}".rstrip())
        if step["error"]:
            print(f"{'  ' * (depth + 1)}error: {step['error'].get('message', '')}")
        _print_steps(step["steps"], depth + 1)
    if len(shown) < len(steps):
        counts: dict[str, int] = {}
        for step in steps[len(shown):]:
            counts[step["status"]] = counts.get(step["status"], 0) + 1
        summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        print(f"{'  ' * depth}... {len(steps) - len(shown)} more ({summary})")


def cmd_get_run(args: argparse.Namespace) -> int:
    run = _client(args).get_run(args.run_id)
    if args.output == "json":
        _print_json(run)
        return 0
    if run["kind"] == "script":
        what = ("script", f"{run['namespace']}/{run['script']}")
        attempts = f"{run['attempts']}" + (f"/{run['maxAttempts']}" if run["maxAttempts"] else "")
    else:
        what = ("flow", f"{run['namespace']}/{run['flow']}")
        attempts = None
    rows = [("id", run["id"]), what, ("version", (run["version"] or "")[:12]),
            ("status", run["status"]), ("attempts", attempts),
            ("restarted from", run.get("restartedFrom")), ("parent run", run.get("parentRun")),
            ("created", run["createdAt"]), ("started", run["startedAt"]),
            ("finished", run["finishedAt"]),
            ("duration", f"{run['durationMs']} ms" if run["durationMs"] is not None else None)]
    for key, value in rows:
        if value is not None:
            print(f"{key + ':':<15} {value}")
    if run["result"] is not None:
        print(f"{'result:':<15} {json.dumps(run['result'])}")
    if run["error"]:
        print(f"{'error:':<15} {run['error'].get('message', '')}")
    if run["kind"] == "flow":
        print("steps:")
        _print_steps(run["steps"], 1)
    return 0


def _table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> None:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _listing(pages, args: argparse.Namespace, header: tuple[str, ...], row, noun: str) -> int:
    """Print a listing's pages as a table (or JSON), saying when more pages follow."""
    items: list[dict[str, Any]] = []
    following = None
    for page in pages:
        items += page["items"]
        following = page["next"]
    if args.output == "json":
        _print_json({"items": items, "next": following})
        return 0
    if not items:
        print(f"no {noun} match", file=sys.stderr)
        return 0
    _table([row(item) for item in items], header)
    if following:
        print(f"(more {noun}: repeat with --all-pages, or a larger --limit)", file=sys.stderr)
    return 0


def _duration(ms: float | None) -> str:
    if ms is None:
        return ""
    return f"{ms:.0f}ms" if ms < 1000 else f"{ms / 1000:.1f}s"


def cmd_runs(args: argparse.Namespace) -> int:
    query = {"script": args.script, "flow": args.flow, "kind": args.kind,
             "status": args.status, "since": args.since, "until": args.until,
             "label": args.label, "limit": str(args.limit)}
    pages = _client(args).list_runs(args.namespace, query, args.all_pages)
    return _listing(pages, args, ("ID", "KIND", "NAME", "STATUS", "CREATED", "DURATION"),
                    lambda run: (run["id"], run["kind"], run["name"] or "", run["status"],
                                 run["createdAt"][:19], _duration(run["durationMs"])), "runs")


def cmd_audit(args: argparse.Namespace) -> int:
    query = {"action": args.action, "user": args.user, "run": args.run, "since": args.since,
             "until": args.until, "limit": str(args.limit)}
    pages = _client(args).list_audit(args.namespace, query, args.all_pages)
    return _listing(pages, args, ("AT", "USER", "ACTION", "RUN", "TARGET", "SOURCE"),
                    lambda entry: (entry["at"][:19], entry["user"]["username"],
                                   entry["action"], entry["run"] or "",
                                   entry["target"] or "", entry["source"]), "audit entries")


def cmd_logs(args: argparse.Namespace) -> int:
    for chunk in _client(args).logs(args.run_id, follow=args.follow):
        sys.stdout.write(chunk)
        sys.stdout.flush()
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    answer = _client(args).cancel(args.run_id)
    print(f"run {answer['id']} {answer['status']}")
    return 0


def cmd_decide(args: argparse.Namespace) -> int:
    approve = args.command == "approve"
    answer = _client(args).decide(args.run_id, approve, args.step)
    print(f"run {answer['id']}: step {answer['step']} {answer['decision']}")
    return 0


def cmd_restart(args: argparse.Namespace) -> int:
    answer = _client(args).restart(args.run_id, args.from_step)
    print(answer["id"])
    return 0


def _run_until_signalled(main) -> int:
    """Run an async main(stop_event) until SIGINT/SIGTERM sets the event."""

    async def runner() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await main(stop) or 0

    return asyncio.run(runner())


async def _migrate_when_reachable(url: str, stop: asyncio.Event) -> bool:
    """Migrate, waiting for the database while it is away (a process that starts with its
    database must not die of it); False when told to stop first."""
    from gristmill.store import connections
    from gristmill.store.migrate import migrate_url

    backoff = connections.Backoff(first=0.5, cap=10)
    while not stop.is_set():
        try:
            await migrate_url(url)
            return True
        except connections.TRANSIENT_ERRORS as exc:
            delay = backoff.next_delay()
            logging.getLogger("gristmill").warning(
                "database unreachable (%s); retrying in %.1fs", str(exc).strip(), delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
    return False


def cmd_worker(args: argparse.Namespace) -> int:
    from gristmill.sandbox import process
    from gristmill.worker.loop import Worker, WorkerConfig, WorkerCrashed

    server = args.server or os.environ.get("GRISTMILL_SERVER")
    url = None if server else _database_url(args)
    token = _worker_token(args) if server else None
    tags = [t.strip() for t in args.tags.split(",") if t.strip()]
    if not tags:
        raise UsageError("--tags needs at least one tag, e.g. --tags python,bash")
    if args.executor == "pod":
        from gristmill.sandbox.pod import PodExecutor
        executor = PodExecutor.from_environment(args.job_image, write_rate=args.pod_write_rate,
                                                write_burst=args.pod_write_burst)
    else:
        # Before the database: a worker whose sandbox cannot run a job must not wait to
        # serve, and says why at once (the executor starts a whole job to find out).
        process.check_sandbox_available()
        executor = process.ProcessExecutor(job_network=args.job_network)
    config = WorkerConfig(database_url=url, server=server, token=token,
                          tags=tags, concurrency=args.concurrency,
                          lease=dt.timedelta(seconds=args.lease), grace_period=args.grace_period,
                          poll_interval=args.poll_interval, stall_after=args.stall_after,
                          health_port=args.health_port or None)

    if args.secrets:
        from gristmill.jobsecrets.from_files import FileSecrets
        secrets = FileSecrets(args.secrets)
    else:
        from gristmill.jobsecrets.from_cluster import ClusterSecrets
        secrets = ClusterSecrets()  # with the worker's ServiceAccount, at the first need

    async def main(stop: asyncio.Event) -> int:
        if url and not await _migrate_when_reachable(url, stop):
            return 0
        try:
            await Worker(config, executor, secrets).run(stop)
        except WorkerCrashed as exc:
            print(f"gristmill: {exc}; exiting for a restart", file=sys.stderr)
            return 1
        return 0

    return _run_until_signalled(main)


def _worker_token(args: argparse.Namespace) -> str:
    if args.token_file:
        token = Path(args.token_file).read_text().strip()
    else:
        token = os.environ.get("GRISTMILL_WORKER_TOKEN", "").strip()
    if not token:
        raise UsageError("a worker of the dispatcher (--server) needs its WorkerGroup's token: "
                         "--token-file or env GRISTMILL_WORKER_TOKEN (the Secret "
                         "gristmill-worker-<group> holds it; `gristmill worker-token` makes "
                         "one)")
    return token


def _worker_token_keys(args: argparse.Namespace) -> tuple[bytes, ...]:
    """The API's (and `worker-token`'s) signing keys: --worker-token-keys-file or env."""
    from gristmill.dispatch import tokens

    path = getattr(args, "worker_token_keys_file", None)
    text = Path(path).read_text() if path else os.environ.get("GRISTMILL_WORKER_TOKEN_KEYS", "")
    if not text.strip():
        return ()
    try:
        return tuple(tokens.parse_keys(text))
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def cmd_worker_token(args: argparse.Namespace) -> int:
    from gristmill.dispatch import tokens

    if args.new_key:
        print(tokens.new_key())
        return 0
    keys = _worker_token_keys(args)
    if not keys:
        raise UsageError("no signing key: set GRISTMILL_WORKER_TOKEN_KEYS or pass "
                         "--worker-token-keys-file (`gristmill worker-token --new-key` makes one)")
    if not (args.namespace and args.group and args.tags):
        raise UsageError("give --namespace, --group and --tags")
    tags = tuple(t.strip() for t in args.tags.split(",") if t.strip())
    print(tokens.issue(keys[0], tokens.WorkerGrant(args.namespace, args.group, tags)))
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from gristmill.store.migrate import migrate_url

    applied = asyncio.run(migrate_url(_database_url(args)))
    print(f"applied {len(applied)} migration(s)" + (
        ": " + ", ".join(f"{m.version:04d}_{m.name}" for m in applied) if applied else
        "; the schema is up to date"))
    return 0


def _retention(text: str) -> dt.timedelta:
    """--retention: how long finished runs, their results and logs are kept."""
    from gristmill.housekeeping import MIN_RETENTION
    from gristmill.spec import parse_duration

    try:
        retention = dt.timedelta(seconds=parse_duration(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if retention < MIN_RETENTION:
        raise argparse.ArgumentTypeError(f"{text} is less than a day; history is kept in day "
                                         f"partitions, so keep it for 1d or more")
    return retention


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number above 0, e.g. 5 or 0.5")
    return value


def _positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def _retention_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--retention", type=_retention, default="30d",
                   help="keep finished runs, results and logs this long, e.g. 7d or 90d "
                        "(%(default)s)")


def _access_settings(args: argparse.Namespace):
    from gristmill.api.access import AccessSettings

    token = None
    if args.authentication == "token":
        if not args.token_file:
            raise UsageError("--authentication token needs --token-file FILE (a random "
                             "token of 16 characters or more)")
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as exc:
            raise UsageError(f"cannot read --token-file {args.token_file}: "
                             f"{exc.strerror}") from exc
        if len(token) < 16:
            raise UsageError(f"the token in {args.token_file} is shorter than 16 characters")
    return AccessSettings(authentication=args.authentication, token=token,
                          audiences=tuple(args.audience or ()), kubeconfig=args.kubeconfig,
                          metrics_need_auth=args.metrics_need_auth)


def cmd_api(args: argparse.Namespace) -> int:
    from gristmill.api.app import ApiSettings
    from gristmill.api.crosssite import SiteSettings
    from gristmill.api.reviewers import AccessMisconfigured
    from gristmill.api.server import serve
    from gristmill.dispatch.hub import DispatchSettings
    from gristmill.housekeeping import run_housekeeping

    url = _database_url(args)
    settings = ApiSettings(database_url=url, pool_size=args.pool_size,
                           database_retry_s=args.database_retry,
                           follow_fallback_s=args.follow_fallback_interval,
                           access=_access_settings(args),
                           dispatch=DispatchSettings(token_keys=_worker_token_keys(args),
                                                     lease=dt.timedelta(seconds=args.lease)),
                           site=SiteSettings(tuple(args.allowed_origin or ()),
                                             tuple(args.allowed_host or ())))

    async def main(stop: asyncio.Event) -> None:
        if not await _migrate_when_reachable(url, stop):
            return
        housekeeping = asyncio.create_task(run_housekeeping(url, args.retention, stop))
        try:
            await serve(settings, args.host, args.port, stop)
        except AccessMisconfigured as exc:
            raise UsageError(str(exc)) from None
        finally:
            stop.set()
            await housekeeping

    return _run_until_signalled(main)


def cmd_apply(args: argparse.Namespace) -> int:
    import psycopg

    from gristmill.dev.manifests import apply_paths

    url = _database_url(args)
    try:
        report = asyncio.run(apply_paths(url, args.paths))
    except (psycopg.Error, OSError) as exc:
        print(f"gristmill: cannot apply to the database: {' '.join(str(exc).split())}",
              file=sys.stderr)
        return 1
    for line in report.lines():
        print(line)
    return 1 if report.errors else 0


def cmd_operator(args: argparse.Namespace) -> int:
    _database_url(args)  # fail early, in one line
    if args.database_url:
        os.environ["GRISTMILL_DATABASE_URL"] = args.database_url
    os.environ["GRISTMILL_METRICS_PORT"] = str(args.metrics_port)
    os.environ["GRISTMILL_AUTOSCALE_INTERVAL"] = str(args.autoscale_interval)
    os.environ["GRISTMILL_RETENTION_SECONDS"] = str(args.retention.total_seconds())
    if args.worker_image:
        os.environ["GRISTMILL_WORKER_IMAGE"] = args.worker_image
    import kopf

    import gristmill.operator.handlers  # noqa: F401  (registers the handlers)

    namespaces = args.namespace or []
    os.environ["GRISTMILL_WATCH_NAMESPACES"] = ",".join(namespaces)
    kopf.run(clusterwide=not namespaces, namespaces=namespaces, standalone=True,
             liveness_endpoint=f"http://0.0.0.0:{args.health_port}/healthz")
    return 0


def cmd_crds(args: argparse.Namespace) -> int:
    from gristmill.spec.crds import render_all

    rendered = render_all()
    if args.output_dir is None:
        print("---\n".join(rendered.values()), end="")
        return 0
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in rendered.items():
        (out / name).write_text(text)
        print(f"wrote {out / name}")
    return 0


def cmd_setup(args: argparse.Namespace) -> int:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    from gristmill import setup_steps
    from gristmill.kube import api_message, load_cluster_config

    if not (args.crds or args.database_secret or args.worker_token_secret):
        raise UsageError("nothing to do: give --crds, --database-secret and/or "
                         "--worker-token-secret")
    if args.database_secret and not args.database_host:
        raise UsageError("--database-secret needs --database-host (the bundled PostgreSQL's "
                         "Service)")
    load_cluster_config()
    try:
        if args.crds:
            for name in setup_steps.apply_crds(client.ApiextensionsV1Api()):
                print(f"applied CRD {name}")
        if args.database_secret:
            db = setup_steps.BundledDatabase(args.namespace, args.database_secret,
                                             args.database_host)
            made = setup_steps.ensure_database_secret(client.CoreV1Api(), db)
            print(f"{'created' if made else 'kept'} Secret {db.namespace}/{db.secret}")
        if args.worker_token_secret:
            made = setup_steps.ensure_worker_token_key(client.CoreV1Api(), args.namespace,
                                                       args.worker_token_secret)
            print(f"{'created' if made else 'kept'} Secret "
                  f"{args.namespace}/{args.worker_token_secret}")
    except ApiException as exc:
        print(f"gristmill setup: the API server refused ({exc.status} {exc.reason}): "
              f"{api_message(exc)}", file=sys.stderr)
        return 1
    except (TimeoutError, RuntimeError) as exc:
        print(f"gristmill setup: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    from gristmill.dev.server import DevOptions, run_dev

    options = DevOptions(
        paths=args.paths, database_url=args.database_url or os.environ.get("GRISTMILL_DATABASE_URL"),
        data_dir=Path(args.data_dir), workers=args.workers or os.cpu_count() or 1,
        host=args.host, port=args.port, retention=args.retention, environ=os.environ,
        secrets=args.secrets,
    )
    return _run_until_signalled(lambda stop: run_dev(options, stop))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gristmill",
                                     description="Scripts and workflows on Kubernetes.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def client_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--server", default=default_server(),
                       help="API URL (env GRISTMILL_SERVER, default %(default)s)")
        p.add_argument("--token", help="bearer token to send (env GRISTMILL_TOKEN; default: "
                                       "a local gristmill dev's own, else the current "
                                       "kubeconfig's credentials)")

    def db_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--database-url", help="PostgreSQL URL (env GRISTMILL_DATABASE_URL)")

    p = sub.add_parser("dev", help="run everything locally: Postgres, API, workers")
    p.add_argument("paths", nargs="*", default=["."], help="manifest files or directories")
    db_args(p)
    p.add_argument("--data-dir", default=".gristmill", help="embedded Postgres data (%(default)s)")
    p.add_argument("--workers", type=int, default=0, help="local workers (default: cores)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--secrets", metavar="PATH", action="append", default=[],
                   help="Kubernetes Secret manifests (kind: Secret, data or stringData) for "
                        "jobs, besides those among the manifests; read by the workers for "
                        "each job, never stored (repeatable)")
    _retention_arg(p)
    p.set_defaults(func=cmd_dev)

    p = sub.add_parser("run", help="submit a run")
    run_sub = p.add_subparsers(dest="what", required=True, metavar="KIND")
    for kind in ("script", "flow"):
        p = run_sub.add_parser(kind, help=f"run a {kind.capitalize()}")
        p.add_argument("name")
        p.add_argument("-n", "--namespace", default="default")
        p.add_argument("--input", help="input as a JSON object")
        p.add_argument("--input-file", help="file holding the input JSON (- for stdin)")
        p.add_argument("--priority", type=int)
        p.add_argument("--label", action="append", metavar="KEY=VALUE",
                       help="label the run (repeatable); `gristmill runs --label` finds it")
        p.add_argument("--batch", metavar="FILE",
                       help="submit many runs: FILE (- for stdin) holds a JSON array of run "
                            "bodies or JSON Lines, one a line, such as {\"input\": {...}, "
                            "\"priority\": 5, \"labels\": {...}}; sent 1,000 a request "
                            "(each all or none); prints the run ids in order")
        p.add_argument("--wait", action="store_true", help="wait and print the result")
        p.add_argument("--timeout", type=float, help="with --wait: give up after SECONDS")
        p.add_argument("-o", "--output", choices=["json"], help="print the whole run as JSON")
        client_args(p)
        p.set_defaults(func=cmd_run)

    p = sub.add_parser("get", help="show a run")
    get_sub = p.add_subparsers(dest="what", required=True, metavar="KIND")
    p = get_sub.add_parser("run", help="show a run")
    p.add_argument("run_id")
    p.add_argument("-o", "--output", choices=["json"])
    client_args(p)
    p.set_defaults(func=cmd_get_run)

    def listing_args(p: argparse.ArgumentParser, noun: str) -> None:
        p.add_argument("-n", "--namespace", default="default")
        p.add_argument("--since", help="only since this: a duration ago (1h, 7d) or an "
                                       "RFC 3339 time")
        p.add_argument("--until", help="only before this (a duration ago or a time)")
        p.add_argument("--limit", type=_positive_int, default=50,
                       help=f"{noun} per page, up to 500 (%(default)s)")
        p.add_argument("--all-pages", action="store_true", help="print every page")
        p.add_argument("-o", "--output", choices=["json"])
        client_args(p)

    p = sub.add_parser("runs", help="list a namespace's runs, newest first")
    p.add_argument("--script", help="only runs of this Script")
    p.add_argument("--flow", help="only runs of this Flow")
    p.add_argument("--kind", choices=["script", "flow"])
    p.add_argument("--status", action="append",
                   help="only runs in this status (repeatable, or a comma list: "
                        "failed,cancelled)")
    p.add_argument("--label", action="append", metavar="KEY=VALUE",
                   help="only runs with this label (repeatable: all of them)")
    listing_args(p, "runs")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("audit", help="who submitted, cancelled, approved, rejected or "
                                     "restarted what")
    p.add_argument("--user", help="only what this user did")
    p.add_argument("--action", action="append",
                   help="only this action: submit, cancel, approve, reject, restart "
                        "(repeatable)")
    p.add_argument("--run", help="only changes to this run")
    listing_args(p, "entries")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("logs", help="print a run's log")
    p.add_argument("run_id")
    p.add_argument("-f", "--follow", action="store_true", help="stream until the run ends")
    client_args(p)
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("cancel", help="cancel a run")
    p.add_argument("run_id")
    client_args(p)
    p.set_defaults(func=cmd_cancel)

    for verb in ("approve", "reject"):
        p = sub.add_parser(verb, help=f"{verb} a flow run's suspended step")
        p.add_argument("run_id")
        p.add_argument("--step", help="the suspended step's path, when several wait")
        client_args(p)
        p.set_defaults(func=cmd_decide)

    p = sub.add_parser("restart", help="re-run a flow run from a step, reusing earlier results")
    p.add_argument("run_id")
    p.add_argument("--from", dest="from_step", required=True, metavar="STEP",
                   help="a top-level step id")
    client_args(p)
    p.set_defaults(func=cmd_restart)

    p = sub.add_parser("worker", help="run a worker (what a WorkerGroup's pods run)")
    db_args(p)
    p.add_argument("--server", metavar="URL",
                   help="get jobs from the API's dispatcher at URL instead of the database "
                        "(env GRISTMILL_SERVER; what WorkerGroup pods do)")
    p.add_argument("--token-file", help="with --server: the file holding the WorkerGroup's "
                                        "worker token (default: env GRISTMILL_WORKER_TOKEN)")
    p.add_argument("--tags", default="python,bash", help="tags to serve (%(default)s)")
    p.add_argument("--concurrency", type=int, default=os.cpu_count() or 1)
    p.add_argument("--lease", type=float, default=30.0,
                   help="seconds without a heartbeat before a worker's jobs are re-queued")
    p.add_argument("--grace-period", type=float, default=30.0,
                   help="seconds to finish running jobs on SIGTERM before handing them back")
    p.add_argument("--poll-interval", type=float, default=30.0,
                   help="the longest an idle worker goes without a claim: it is woken by "
                        "notifications and when the next delayed job is due (%(default)s s)")
    p.add_argument("--health-port", type=int, default=0,
                   help="serve the liveness probe GET /healthz on this port (0: none)")
    p.add_argument("--stall-after", type=float, default=60.0,
                   help="liveness: seconds a loop may go without success (%(default)s)")
    p.add_argument("--executor", choices=["process", "pod"], default="process",
                   help="process: a sandboxed process here; pod: a Kubernetes pod per job")
    p.add_argument("--job-image", help="pod executor: the job pods' image "
                                       "(env GRISTMILL_JOB_IMAGE)")
    p.add_argument("--job-network", choices=["pasta", "pod"], default="pasta",
                   help="process executor, sandbox.network jobs: pasta: a network namespace "
                        "of the job's own (needs /dev/net/tun); pod: the worker pod's own "
                        "network namespace, shared (a pod's only, never the node's; what "
                        "the operator passes)")
    p.add_argument("--secrets", metavar="PATH", action="append", default=[],
                   help="process executor: read jobs' Secrets from the Kubernetes Secret "
                        "manifests in PATH (a file or directory; repeatable) instead of the "
                        "Kubernetes API (what `gristmill dev --secrets` passes)")
    p.add_argument("--pod-write-rate", type=_positive_float, metavar="PER_SECOND",
                   default=os.environ.get("GRISTMILL_POD_WRITE_RATE", "5"),
                   help="pod executor: API writes (job pods and Secrets created, pods deleted) "
                        "a second after a burst; jobs wait their turn (env "
                        "GRISTMILL_POD_WRITE_RATE, %(default)s)")
    p.add_argument("--pod-write-burst", type=_positive_int, metavar="WRITES",
                   default=os.environ.get("GRISTMILL_POD_WRITE_BURST", "10"),
                   help="pod executor: API writes at once before the rate applies; a job "
                        "takes 2 to start (env GRISTMILL_POD_WRITE_BURST, %(default)s)")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("api", help="serve the HTTP API")
    db_args(p)
    p.add_argument("--worker-token-keys-file", metavar="PATH",
                   help="the keys worker tokens are signed with (default: env "
                        "GRISTMILL_WORKER_TOKEN_KEYS); without any, no worker may connect to "
                        "the dispatcher")
    p.add_argument("--lease", type=float, default=30.0,
                   help="dispatcher: seconds without a connected worker before its jobs are "
                        "re-queued (%(default)s)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--pool-size", type=int, default=8, help="database connections (%(default)s)")
    p.add_argument("--database-retry", type=float, default=5.0, metavar="SECONDS",
                   help="how long a request retries a database that is away before it is "
                        "answered 503 (%(default)s)")
    p.add_argument("--follow-fallback-interval", type=float, default=30.0, metavar="SECONDS",
                   help="followed logs are woken by notifications; without one they are "
                        "re-read this often (%(default)s)")
    p.add_argument("--authentication", choices=["kubernetes", "token"], default="kubernetes",
                   help="kubernetes: bearer tokens checked with TokenReview, actions with "
                        "SubjectAccessReview (as the pod's ServiceAccount or --kubeconfig); "
                        "token: one local token (--token-file) that may do everything")
    p.add_argument("--token-file", help="with --authentication token: the file holding it")
    p.add_argument("--audience", action="append",
                   help="accept only tokens meant for this audience (repeatable; default: "
                        "the API server's own, what kubectl and exec plugins hand out)")
    p.add_argument("--kubeconfig", help="review tokens as this kubeconfig's user instead of "
                                        "the pod's ServiceAccount")
    p.add_argument("--metrics-need-auth", action="store_true",
                   help="GET /metrics needs a token allowed `get` on the non-resource URL "
                        "/metrics (default: open, like /healthz)")
    p.add_argument("--allowed-origin", action="append", metavar="ORIGIN",
                   help="a browser origin besides the API's own that may call it, e.g. "
                        "https://ui.example.com (repeatable)")
    p.add_argument("--allowed-host", action="append", metavar="NAME",
                   help="a name the API may be addressed by (Host), besides IP addresses and "
                        "localhost; *.example.com for a whole domain (repeatable)")
    _retention_arg(p)
    p.set_defaults(func=cmd_api)

    p = sub.add_parser("worker-token", help="make a worker token for `gristmill worker "
                                            "--server` (the operator makes one per WorkerGroup)")
    p.add_argument("--namespace", help="the WorkerGroup's namespace")
    p.add_argument("--group", help="the WorkerGroup's name")
    p.add_argument("--tags", help="the tags it may serve, comma-separated")
    p.add_argument("--worker-token-keys-file", metavar="PATH",
                   help="the signing keys (default: env GRISTMILL_WORKER_TOKEN_KEYS)")
    p.add_argument("--new-key", action="store_true", help="print a new signing key instead")
    p.set_defaults(func=cmd_worker_token)

    p = sub.add_parser("migrate", help="create or upgrade the database schema")
    db_args(p)
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("operator", help="run the Kubernetes operator (kopf)")
    db_args(p)
    p.add_argument("-n", "--namespace", action="append",
                   help="watch only this namespace (repeatable; default: all)")
    p.add_argument("--health-port", type=int, default=8081, help="liveness probe port")
    p.add_argument("--metrics-port", type=int, default=9090,
                   help="Prometheus /metrics port (0: none)")
    p.add_argument("--autoscale-interval", type=float, default=5.0,
                   help="seconds between autoscaling decisions (%(default)s)")
    p.add_argument("--worker-image",
                   help="image of WorkerGroups that name none (env GRISTMILL_WORKER_IMAGE; "
                        "default ghcr.io/gristmill/worker:<this version>; the chart passes "
                        "the image it installs)")
    _retention_arg(p)
    p.set_defaults(func=cmd_operator)

    p = sub.add_parser("crds", help="print (or write) the CustomResourceDefinitions")
    p.add_argument("--output-dir", help="write one file per CRD here (e.g. crds/)")
    p.set_defaults(func=cmd_crds)

    p = sub.add_parser("setup", help="install/upgrade step (the chart's hook): apply the "
                                     "CRDs, make the bundled database's Secret and the "
                                     "worker-token key's once")
    p.add_argument("--crds", action="store_true", help="server-side apply the CRDs")
    p.add_argument("--database-secret", metavar="NAME",
                   help="create this Secret (url, password) unless it exists")
    p.add_argument("--database-host", help="the bundled PostgreSQL's Service name")
    p.add_argument("--worker-token-secret", metavar="NAME",
                   help="create this Secret (key `keys`: a new worker-token signing key) "
                        "unless it exists")
    p.add_argument("-n", "--namespace", default="default", help="of the Secrets")
    p.set_defaults(func=cmd_setup)

    p = sub.add_parser("apply", help="store Script and Flow manifests in the database (no cluster)")
    p.add_argument("paths", nargs="+")
    db_args(p)
    p.set_defaults(func=cmd_apply)
    return parser


def main(argv: list[str] | None = None) -> int:
    from gristmill.dev.postgres import PostgresNotFound
    from gristmill.kube import ClusterUnavailable
    from gristmill.sandbox.base import SandboxUnavailable

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=os.environ.get("GRISTMILL_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (UsageError, ApiError, PostgresNotFound, SandboxUnavailable,
            ClusterUnavailable) as exc:
        print(f"gristmill: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `gristmill logs ID | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
