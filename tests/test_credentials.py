"""Which token the CLI sends: an explicit one, a local `gristmill dev`'s, or the current
kubeconfig's (a token, or what an exec plugin hands out), read by the real kubernetes
client; a certificate-only kubeconfig gives none, and says why."""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

from gristmill.credentials import resolve
from gristmill.dev import token as dev_token

REMOTE = "https://gristmill.example.com"


def kubeconfig(tmp_path: Path, user: dict) -> dict[str, str]:
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "me",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:6443"}}],
        "users": [{"name": "me", "user": user}],
        "contexts": [{"name": "me", "context": {"cluster": "c", "user": "me"}}]}))
    return {"KUBECONFIG": str(path), "HOME": str(tmp_path)}


def test_an_explicit_token_wins_then_the_environment(tmp_path):
    environ = {**kubeconfig(tmp_path, {"token": "from-kubeconfig"}), "GRISTMILL_TOKEN": "env"}
    assert resolve(REMOTE, "flag", environ).token == "flag"
    assert resolve(REMOTE, None, environ).token == "env"


def test_the_kubeconfig_token_and_an_exec_plugin_s_token_are_sent(tmp_path):
    assert resolve(REMOTE, None, kubeconfig(tmp_path, {"token": "abc"})).token == "abc"
    plugin = tmp_path / "plugin"
    plugin.write_text(f"#!{sys.executable}\nimport json\nprint(json.dumps({{"
                      "'apiVersion': 'client.authentication.k8s.io/v1', 'kind': "
                      "'ExecCredential', 'status': {'token': 'from-the-plugin'}}))\n")
    plugin.chmod(0o755)
    exec_user = {"exec": {"apiVersion": "client.authentication.k8s.io/v1",
                          "command": str(plugin), "interactiveMode": "Never"}}
    found = resolve(REMOTE, None, kubeconfig(tmp_path, exec_user))
    assert found.token == "from-the-plugin" and "kubeconfig" in found.source


def test_a_certificate_only_kubeconfig_gives_no_token_and_says_why(tmp_path):
    pem = base64.b64encode(b"-----BEGIN CERTIFICATE-----\nMA==\n-----END CERTIFICATE-----\n")
    user = {"client-certificate-data": pem.decode(), "client-key-data": pem.decode()}
    found = resolve(REMOTE, None, kubeconfig(tmp_path, user))
    assert found.token is None and "client certificate" in found.source
    missing = resolve(REMOTE, None, {"KUBECONFIG": str(tmp_path / "none"),
                                     "HOME": str(tmp_path)})
    assert missing.token is None and "GRISTMILL_TOKEN" in missing.source


def test_a_local_server_s_token_is_found_by_its_port(tmp_path):
    environ = {"XDG_RUNTIME_DIR": str(tmp_path / "run"), "HOME": str(tmp_path),
               "KUBECONFIG": str(tmp_path / "none")}
    token_file = dev_token.create(tmp_path / "data", 18080, environ)
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "run" / "gristmill" / "dev-servers").stat().st_mode & 0o777 == 0o700
    token = token_file.read_text().strip()
    for server in ("http://127.0.0.1:18080", "http://localhost:18080", "http://[::1]:18080"):
        assert resolve(server, None, environ).token == token
    assert resolve("http://127.0.0.1:18081", None, environ).token is None  # another port
    assert resolve("http://10.0.0.5:18080", None, environ).token is None  # not this machine
    dev_token.forget(18080, tmp_path / "data", environ)
    assert resolve("http://127.0.0.1:18080", None, environ).token is None
