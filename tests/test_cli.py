"""The CLI as a user runs it: `gristmill dev` in a subprocess, then run, get, logs, cancel."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psycopg
import pytest

from gristmill.dev.postgres import EmbeddedPostgres

EXAMPLES = Path(__file__).parent.parent / "examples"


def gristmill(*args: str, server: str | None = None, env: dict | None = None,
              timeout: float = 60) -> subprocess.CompletedProcess:
    environment = {**os.environ, **(env or {})}
    if server:
        environment["GRISTMILL_SERVER"] = server
    return subprocess.run([sys.executable, "-m", "gristmill.cli", *args], capture_output=True,
                          text=True, env=environment, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(server: str, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read()
        try:
            with urllib.request.urlopen(f"{server}/healthz", timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError("gristmill dev did not come up")


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    """`gristmill dev` on a copy of examples/, as a user starts it."""
    root = tmp_path_factory.mktemp("dev")
    manifests = root / "manifests"
    shutil.copytree(EXAMPLES, manifests)
    port = free_port()
    server = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "gristmill.cli", "dev", str(manifests), "--port", str(port),
               "--workers", "2", "--data-dir", str(root / "data")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, cwd=root)
    wait_healthy(server, process)
    yield {"server": server, "manifests": manifests, "process": process, "command": command,
           "root": root}
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)


def test_run_script_wait_prints_the_result(dev):
    done = gristmill("run", "script", "hello", "--input", '{"name": "world"}', "--wait",
                     server=dev["server"])
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"greeting": "Hello, world."}
    bash = gristmill("run", "script", "word-count", "--input", '{"text": "a b a"}', "--wait",
                     server=dev["server"])
    assert json.loads(bash.stdout) == {"words": 3, "distinct": 2}


def test_run_flow_and_read_it_back(dev):
    done = gristmill("run", "flow", "process-orders", "--input", '{"batch": "b1", "count": 4}',
                     "--wait", "-o", "json", server=dev["server"])
    assert done.returncode == 0, done.stderr
    run = json.loads(done.stdout)
    assert run["status"] == "succeeded"
    assert run["result"] == {"batch": "b1", "total": 75.0, "orders": 4}
    shown = gristmill("get", "run", run["id"], server=dev["server"])
    assert "price_one[3]" in shown.stdout and "x2" in shown.stdout  # retried once
    assert "autoapprove" in shown.stdout
    log = gristmill("logs", run["id"], server=dev["server"])
    assert "pricing service timed out" in log.stdout


def test_failed_run_prints_the_error_and_the_log_tail(dev):
    (dev["manifests"] / "broken.yaml").write_text(
        "apiVersion: gristmill.io/v1alpha1\nkind: Script\nmetadata: {name: broken}\n"
        "spec:\n  language: python\n  code: |\n    def main():\n"
        "        print('about to fail')\n        raise ValueError('bad data')\n")
    deadline = time.monotonic() + 20
    while True:  # dev reloads the directory when it changes
        done = gristmill("run", "script", "broken", "--wait", server=dev["server"])
        if "not found" not in done.stderr or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert done.returncode == 1
    assert "ValueError: bad data" in done.stderr and "about to fail" in done.stderr


def test_bad_input_is_refused_before_queueing(dev):
    wrong_type = gristmill("run", "script", "hello", "--input", '{"name": 3}', "--wait",
                           server=dev["server"])
    assert wrong_type.returncode == 1
    assert "input.name: 3 is not of type 'string'" in wrong_type.stderr
    typo = gristmill("run", "script", "hello", "--input", '{"nmae": "x"}', server=dev["server"])
    assert "unknown field 'nmae' (expected one of: excited, name)" in typo.stderr
    not_json = gristmill("run", "script", "hello", "--input", "{name: x}", server=dev["server"])
    assert not_json.returncode == 2 and "not valid JSON" in not_json.stderr
    missing = gristmill("run", "script", "nope", server=dev["server"])
    assert "Script default/nope not found" in missing.stderr
    assert "Traceback" not in wrong_type.stderr + typo.stderr + not_json.stderr + missing.stderr


def test_run_batch_submits_a_file_of_runs_in_order(dev, tmp_path):
    lines = tmp_path / "runs.jsonl"
    later = "2999-01-01T00:00:00Z"  # no worker of the module's `gristmill dev` runs them
    lines.write_text("\n".join(json.dumps({"input": {"name": f"b{i}"}, "scheduledFor": later})
                               for i in range(1002)) + "\n")
    done = gristmill("run", "script", "hello", "--batch", str(lines), "--label", "from=cli",
                     "--priority", "-5", server=dev["server"])
    assert done.returncode == 0, done.stderr
    ids = done.stdout.split()
    assert len(ids) == len(set(ids)) == 1002  # two requests: 1,000 and 2
    shown = json.loads(gristmill("get", "run", ids[1001], "-o", "json",
                                 server=dev["server"]).stdout)
    assert shown["input"] == {"name": "b1001"} and shown["labels"] == {"from": "cli"}
    assert shown["priority"] == -5
    array = tmp_path / "runs.json"
    array.write_text(json.dumps([{"input": {"name": "ok"}}, {"input": {"name": 3}}]))
    refused = gristmill("run", "script", "hello", "--batch", str(array), server=dev["server"])
    assert refused.returncode == 1 and "runs[1]: input does not match" in refused.stderr
    assert refused.stdout == ""
    both = gristmill("run", "script", "hello", "--batch", str(array), "--input", "{}",
                     server=dev["server"])
    assert both.returncode == 2 and "leave out --input" in both.stderr


def test_bad_manifests_are_reported_and_nothing_of_them_applied(dev):
    bad = dev["manifests"] / "bad.yaml"
    bad.write_text(
        "apiVersion: gristmill.io/v1alpha1\nkind: Script\nmetadata: {name: half-good}\n"
        "spec: {language: python, code: 'def main(): return 1'}\n---\n"
        "apiVersion: gristmill.io/v1alpha1\nkind: Script\nmetadata: {name: typo}\n"
        "spec: {language: python, tmeout: 5s, code: 'def main(): return 1'}\n")
    result = gristmill("apply", str(bad), "--database-url", _database_url(dev))
    assert result.returncode == 1
    assert f"{bad}: Script 'typo': spec.tmeout: unknown field" in result.stdout
    assert "half-good" not in result.stdout.replace(str(bad), "")  # all or nothing
    assert "not found" in gristmill("run", "script", "half-good", server=dev["server"]).stderr
    bad.unlink()


def _database_url(dev) -> str:
    """The embedded server's URL: its port and password are kept in its data dir."""
    return EmbeddedPostgres(dev["root"] / "data" / "postgres").url()


def test_cancel_a_running_script(dev):
    (dev["manifests"] / "sleepy.yaml").write_text(
        "apiVersion: gristmill.io/v1alpha1\nkind: Script\nmetadata: {name: sleepy}\n"
        "spec:\n  language: bash\n  code: sleep 60\n")
    deadline = time.monotonic() + 20
    while True:
        submitted = gristmill("run", "script", "sleepy", server=dev["server"])
        if submitted.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    run_id = submitted.stdout.strip()
    for _ in range(100):
        if json.loads(gristmill("get", "run", run_id, "-o", "json",
                                server=dev["server"]).stdout)["status"] == "running":
            break
        time.sleep(0.1)
    assert gristmill("cancel", run_id, server=dev["server"]).returncode == 0
    for _ in range(100):
        run = json.loads(gristmill("get", "run", run_id, "-o", "json",
                                   server=dev["server"]).stdout)
        if run["status"] == "cancelled":
            break
        time.sleep(0.1)
    assert run["status"] == "cancelled"
    again = gristmill("cancel", run_id, server=dev["server"])
    assert again.returncode == 1 and "already ended (cancelled)" in again.stderr


def test_metrics_report_the_queue(dev):
    with urllib.request.urlopen(f"{dev['server']}/metrics", timeout=5) as response:
        text = response.read().decode()
    assert "# TYPE gristmill_queue_jobs gauge" in text
    assert "gristmill_queue_oldest_job_age_seconds" in text


def _labelled_runs(dev, label: str, count: int) -> list[str]:
    ids = []
    for i in range(count):
        done = gristmill("run", "script", "hello", "--input", json.dumps({"name": str(i)}),
                         "--label", label, "--label", "suite=cli", "-o", "json", "--wait",
                         server=dev["server"])
        assert done.returncode == 0, done.stderr
        ids.append(json.loads(done.stdout)["id"])
    return ids


def test_runs_lists_filters_and_pages(dev):
    ids = _labelled_runs(dev, "test=runs-listing", 3)
    table = gristmill("runs", "--label", "test=runs-listing", "--since", "1h",
                      server=dev["server"])
    assert table.returncode == 0, table.stderr
    header, *lines = table.stdout.splitlines()
    assert header.split() == ["ID", "KIND", "NAME", "STATUS", "CREATED", "DURATION"]
    assert [line.split()[:4] for line in lines] == [
        [run_id, "script", "hello", "succeeded"] for run_id in reversed(ids)]
    first = gristmill("runs", "--label", "test=runs-listing", "--limit", "2",
                      server=dev["server"])
    assert len(first.stdout.splitlines()) == 3 and "--all-pages" in first.stderr
    every = gristmill("runs", "--label", "test=runs-listing", "--label", "suite=cli",
                      "--limit", "1", "--all-pages", "-o", "json", server=dev["server"])
    listed = json.loads(every.stdout)
    assert [run["id"] for run in listed["items"]] == list(reversed(ids))
    assert listed["next"] is None and listed["items"][0]["labels"]["suite"] == "cli"
    none = gristmill("runs", "--label", "test=runs-listing", "--status", "failed,cancelled",
                     server=dev["server"])
    assert none.returncode == 0 and none.stdout == "" and "no runs match" in none.stderr
    bad = gristmill("runs", "--status", "exploded", server=dev["server"])
    assert bad.returncode == 1 and "status 'exploded' is not one of" in bad.stderr


def test_audit_says_who_did_what(dev):
    (run_id,) = _labelled_runs(dev, "test=audit-cli", 1)
    listed = gristmill("audit", "--run", run_id, "-o", "json", server=dev["server"])
    assert listed.returncode == 0, listed.stderr
    (entry,) = json.loads(listed.stdout)["items"]
    assert (entry["action"], entry["target"], entry["source"]) == ("submit", "hello",
                                                                   "127.0.0.1")
    table = gristmill("audit", "--action", "submit", "--since", "1d", "--limit", "500",
                      server=dev["server"])
    header, *lines = table.stdout.splitlines()
    assert header.split() == ["AT", "USER", "ACTION", "RUN", "TARGET", "SOURCE"]
    assert any(run_id in line and "submit" in line for line in lines)
    nobody = gristmill("audit", "--user", "nobody-at-all", server=dev["server"])
    assert nobody.returncode == 0 and "no audit entries match" in nobody.stderr


class FlakyProxy(http.server.ThreadingHTTPServer):
    """Sits between the CLI and the API: the first POST reaches the API but its answer is
    dropped (the connection closes), the second gets a 503, the rest pass through."""

    def __init__(self, upstream: str, script: list[str]):
        self.upstream = upstream
        self.script = script
        self.seen: list[dict[str, str]] = []  # the headers of every POST
        super().__init__(("127.0.0.1", 0), FlakyProxyHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class FlakyProxyHandler(http.server.BaseHTTPRequestHandler):
    server: FlakyProxy

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.seen.append(dict(self.headers))
        action = self.server.script.pop(0) if self.server.script else "pass"
        if action == "503":
            answer = b'{"error": "the database is unavailable (test)"}'
            self.send_response(503)
            self.send_header("Retry-After", "0")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)
            return
        request = urllib.request.Request(
            self.server.upstream + self.path, data=body, method="POST",
            headers={k: v for k, v in self.headers.items() if k.lower() != "host"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status, headers, answer = response.status, response.headers, response.read()
        except urllib.error.HTTPError as exc:
            status, headers, answer = exc.code, exc.headers, exc.read()
        if action == "drop":  # the run was made; the client never hears of it
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.send_response(status)
        for name in ("Content-Type", "Idempotent-Replayed"):
            if headers.get(name):
                self.send_header(name, headers[name])
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)


def _runs_with_input(dev, value: str) -> list[str]:
    import psycopg

    with psycopg.connect(_database_url(dev)) as conn:
        rows = conn.execute(
            "SELECT id FROM jobs WHERE input->>'name' = %(v)s UNION ALL "
            "SELECT id FROM job_history WHERE input->>'name' = %(v)s", {"v": value}).fetchall()
    return [str(row[0]) for row in rows]


def _token(dev) -> str:
    return (dev["root"] / "data" / "api-token").read_text().strip()


def test_run_retries_a_dropped_or_refused_submit_without_a_second_run(dev):
    proxy = FlakyProxy(dev["server"], ["drop", "503"])
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    # The proxy's port is not dev's, so the CLI is told the token.
    token = {"GRISTMILL_TOKEN": _token(dev)}
    try:
        name = f"retry-{time.monotonic_ns()}"
        done = gristmill("run", "script", "hello", "--input", json.dumps({"name": name}),
                         server=proxy.url, env=token)
        assert done.returncode == 0, done.stderr
        assert "retrying" in done.stderr and "Traceback" not in done.stderr
        keys = [headers["Idempotency-Key"] for headers in proxy.seen]
        assert len(keys) == 3 and len(set(keys)) == 1  # three tries, one request
        # The run the dropped answer announced is the only one, and the one printed.
        assert _runs_with_input(dev, name) == [done.stdout.strip()]
        again = gristmill("run", "script", "hello", "--input", json.dumps({"name": name}),
                          server=proxy.url, env=token)
        assert again.returncode == 0 and proxy.seen[-1]["Idempotency-Key"] not in keys
        assert len(_runs_with_input(dev, name)) == 2  # a new invocation is a new run
    finally:
        proxy.shutdown()
        proxy.server_close()


def test_dev_refuses_callers_without_its_token(dev, tmp_path):
    for headers in ({}, {"Authorization": "Bearer not-the-dev-token"}):
        request = urllib.request.Request(f"{dev['server']}/api/v1/flows", headers=headers)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=5)
        assert refused.value.code == 401
        assert refused.value.headers["WWW-Authenticate"].startswith("Bearer")
    token_file = dev["root"] / "data" / "api-token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    # The CLI with a wrong token says so, and where the token came from.
    wrong = gristmill("get", "run", "3f2b8c4e-1d2a-4b6e-9f10-2a3b4c5d6e7f", server=dev["server"],
                      env={"GRISTMILL_TOKEN": "not-the-dev-token"})
    assert wrong.returncode == 1 and "GRISTMILL_TOKEN" in wrong.stderr, wrong.stderr
    # Without dev's registry (another user, say), it has nothing to send: a 401 saying why.
    alone = gristmill("get", "run", "3f2b8c4e-1d2a-4b6e-9f10-2a3b4c5d6e7f",
                      server=dev["server"], env={"HOME": str(tmp_path), "XDG_RUNTIME_DIR": "",
                                                 "KUBECONFIG": str(tmp_path / "none")})
    assert alone.returncode == 1 and "needs credentials" in alone.stderr, alone.stderr
    assert "Traceback" not in alone.stderr


def test_approvals_are_made_as_the_token_s_caller(dev):
    (dev["manifests"] / "gated.yaml").write_text(
        "apiVersion: gristmill.io/v1alpha1\nkind: Flow\nmetadata: {name: gated}\n"
        "spec:\n  steps:\n    - {id: gate, suspend: {timeout: 1h}}\n")
    deadline = time.monotonic() + 30
    while True:  # dev reloads the directory when it changes
        submitted = gristmill("run", "flow", "gated", server=dev["server"])
        if submitted.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert submitted.returncode == 0, submitted.stderr
    run_id = submitted.stdout.strip()
    approved = gristmill("approve", run_id, server=dev["server"])
    assert approved.returncode == 0 and "approved" in approved.stdout, approved.stderr
    run = json.loads(gristmill("get", "run", run_id, "-o", "json", server=dev["server"]).stdout)
    assert run["steps"][0]["approvedBy"] == "gristmill-dev"
    assert "--by" not in gristmill("approve", "--help").stdout


def test_ctrl_c_stops_cleanly_and_the_data_dir_is_reusable(dev):
    process = dev["process"]
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 0
    output = process.stdout.read()
    assert "Traceback" not in output and "stopping" in output
    port = free_port()
    command = [*dev["command"][:-4], "--port", str(port), *dev["command"][-2:]]
    again = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, cwd=dev["root"])
    try:
        wait_healthy(f"http://127.0.0.1:{port}", again)
        done = gristmill("run", "script", "hello", "--wait", server=f"http://127.0.0.1:{port}")
        assert json.loads(done.stdout) == {"greeting": "Hello, world."}
    finally:
        again.send_signal(signal.SIGINT)
        assert again.wait(timeout=60) == 0


def test_missing_bubblewrap_is_one_line_with_the_fix(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    result = gristmill("worker", "--database-url", "postgresql://nowhere/x",
                       env={"PATH": str(bin_dir)})
    assert result.returncode == 1
    assert result.stderr.strip() == ("gristmill: bubblewrap (bwrap) not found; install it with: "
                                     "apt-get install -y bubblewrap")


def test_unreachable_server_says_how_to_fix_it():
    result = gristmill("get", "run", "3f2b8c4e-1d2a-4b6e-9f10-2a3b4c5d6e7f",
                       server=f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert "cannot reach the Gristmill API" in result.stderr and "gristmill dev" in result.stderr


def _children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(child) for child in found.split()]


def test_killed_dev_takes_its_workers_and_keeps_its_database_port(tmp_path):
    port = free_port()
    command = [sys.executable, "-m", "gristmill.cli", "dev", str(EXAMPLES), "--port", str(port),
               "--workers", "2", "--data-dir", str(tmp_path / "data")]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, cwd=tmp_path)
    wait_healthy(f"http://127.0.0.1:{port}", first)
    database = EmbeddedPostgres(tmp_path / "data" / "postgres")
    workers = _children(first.pid)
    assert len(workers) == 2
    first.kill()  # SIGKILL: nothing of dev's own runs
    first.wait()
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in workers):
        assert time.monotonic() < deadline, "workers outlived gristmill dev"
        time.sleep(0.2)
    # Anyone who may not read the data dir's password cannot log in, even on 127.0.0.1.
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(f"postgresql://gristmill@127.0.0.1:{database.port}/gristmill").close()
    second = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, cwd=tmp_path)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", second)
        again = EmbeddedPostgres(tmp_path / "data" / "postgres")
        assert again.port == database.port  # URLs given out before still work
        psycopg.connect(again.url()).close()
    finally:
        second.send_signal(signal.SIGINT)
        assert second.wait(timeout=60) == 0
