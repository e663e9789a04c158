"""A real Kubernetes control plane for the tests: etcd, kube-apiserver, kube-controller-manager.

Started as envtest starts one, with what a stock cluster enforces: RBAC, and the
PodSecurity and OwnerReferencesPermissionEnforcement admission plugins beside the
default ones. The admin authenticates with a static token; everyone else with real
service-account tokens the API server issues (TokenRequest), so RBAC bindings to a
ServiceAccount apply to them exactly as in a cluster. The controller manager adds
garbage collection, Deployments -> ReplicaSets -> Pods, namespace deletion,
service accounts and the root CA ConfigMap.

Nothing runs pods here: k8s_node.py is the kubelet. Pods reach the API server, and
the API server reaches that kubelet, on a bridge of the session's own (pod_network).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import os
import secrets
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from k8s_build import Binaries

ADMIN = "admin"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# ---- a certificate authority of the session's own -----------------------------------------

def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem_key(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass
class Authority:
    """A CA and the certificates it signs (the API server's, the kubelet's)."""

    directory: Path
    key: rsa.RSAPrivateKey = field(default_factory=_key)

    def __post_init__(self) -> None:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gristmill-test-ca")])
        now = dt.datetime.now(dt.UTC)
        self.cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - dt.timedelta(hours=1))
                     .not_valid_after(now + dt.timedelta(days=7))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
                     .sign(self.key, hashes.SHA256()))
        self.ca_file = self.directory / "ca.crt"
        self.ca_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, name: str, hosts: list[str]) -> tuple[Path, Path]:
        """A serving certificate for `hosts` (names and IPs): (cert file, key file)."""
        key = _key()
        alternatives = [x509.IPAddress(ipaddress.ip_address(h)) if h[0].isdigit()
                        else x509.DNSName(h) for h in hosts]
        now = dt.datetime.now(dt.UTC)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                .issuer_name(self.cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(hours=1))
                .not_valid_after(now + dt.timedelta(days=7))
                .add_extension(x509.SubjectAlternativeName(alternatives), False)
                .sign(self.key, hashes.SHA256()))
        cert_file, key_file = self.directory / f"{name}.crt", self.directory / f"{name}.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(_pem_key(key))
        key_file.chmod(0o600)
        return cert_file, key_file


# ---- the control plane ------------------------------------------------------------------------

@dataclass
class ControlPlane:
    binaries: Binaries
    root: Path
    host: str  # the address everything listens on (the pod network's gateway)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    def start(self) -> ControlPlane:
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> ControlPlane:
        self.root.mkdir(parents=True, exist_ok=True)
        self.authority = Authority(self.root)
        cert, key = self.authority.issue("kube-apiserver", [
            self.host, "127.0.0.1", "localhost", "kubernetes", "kubernetes.default",
            "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"])
        sa_key = self.root / "service-accounts.key"
        sa_key.write_bytes(_pem_key(_key()))
        self.admin_token = secrets.token_urlsafe(32)
        tokens = self.root / "tokens.csv"
        tokens.write_text(f'{self.admin_token},{ADMIN},{ADMIN},"system:masters"\n')
        tokens.chmod(0o600)
        self.port = free_port(self.host)
        etcd_port, peer_port = free_port(), free_port()
        self._spawn("etcd", self.binaries.etcd,
                    "--data-dir", str(self.root / "etcd"), "--unsafe-no-fsync",
                    "--listen-client-urls", f"http://127.0.0.1:{etcd_port}",
                    "--advertise-client-urls", f"http://127.0.0.1:{etcd_port}",
                    "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
                    "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
                    "--initial-cluster", f"default=http://127.0.0.1:{peer_port}",
                    "--log-level", "warn")
        self._spawn("kube-apiserver", self.binaries.kube_apiserver,
                    "--etcd-servers", f"http://127.0.0.1:{etcd_port}",
                    "--bind-address", self.host, "--advertise-address", self.host,
                    "--secure-port", str(self.port), "--endpoint-reconciler-type", "none",
                    "--tls-cert-file", str(cert), "--tls-private-key-file", str(key),
                    "--client-ca-file", str(self.authority.ca_file),
                    "--token-auth-file", str(tokens), "--authorization-mode", "RBAC",
                    "--enable-admission-plugins",
                    "PodSecurity,OwnerReferencesPermissionEnforcement",
                    "--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
                    "--service-account-key-file", str(sa_key),
                    "--service-account-signing-key-file", str(sa_key),
                    "--service-cluster-ip-range", "10.96.0.0/16",
                    "--kubelet-preferred-address-types", "InternalIP",
                    "--allow-privileged=true")
        self._wait_ready()
        self.admin_kubeconfig = self.kubeconfig(self.admin_token, "admin")
        self._spawn("kube-controller-manager", self.binaries.kube_controller_manager,
                    "--kubeconfig", str(self.admin_kubeconfig),
                    "--authentication-kubeconfig", str(self.admin_kubeconfig),
                    "--authorization-kubeconfig", str(self.admin_kubeconfig),
                    "--leader-elect=false", "--use-service-account-credentials=false",
                    "--service-account-private-key-file", str(sa_key),
                    "--root-ca-file", str(self.authority.ca_file),
                    # The kubelet stand-in keeps its node Ready; no cloud, no node IPAM.
                    "--controllers", "*,-node-lifecycle-controller,-node-ipam-controller",
                    "--concurrent-gc-syncs", "5", "--secure-port", "0")
        self._wait_for_default_service_account()
        return self

    def _spawn(self, name: str, binary: Path, *args: str) -> None:
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 (kept open for the process)
        self.processes[name] = subprocess.Popen([str(binary), *args], stdout=log,
                                                stderr=subprocess.STDOUT,
                                                start_new_session=True)

    def log_tail(self, name: str, lines: int = 30) -> str:
        text = (self.root / f"{name}.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def _check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}:\n"
                                   f"{self.log_tail(name)}")

    def _wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            with contextlib.suppress(OSError, urllib.error.URLError):
                if self.get("/readyz", token=self.admin_token, raw=True) == b"ok":
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"kube-apiserver not ready after {timeout:g}s:\n"
                                   f"{self.log_tail('kube-apiserver')}")
            time.sleep(0.3)

    def _wait_for_default_service_account(self, timeout: float = 60) -> None:
        """Pods are admitted only once the namespace has its `default` ServiceAccount."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            with contextlib.suppress(urllib.error.HTTPError):
                self.get("/api/v1/namespaces/default/serviceaccounts/default")
                return
            if time.monotonic() > deadline:
                raise RuntimeError("kube-controller-manager made no default ServiceAccount:\n"
                                   + self.log_tail("kube-controller-manager"))
            time.sleep(0.3)

    def stop(self) -> None:
        for name in ("kube-controller-manager", "kube-apiserver", "etcd"):
            process = self.processes.get(name)
            if process and process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()

    # ---- clients ----------------------------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.authority.ca_file))

    def get(self, path: str, token: str | None = None, raw: bool = False):
        return self.request("GET", path, token=token, raw=raw)

    def request(self, method: str, path: str, body: dict | None = None,
                token: str | None = None, raw: bool = False,
                content_type: str = "application/json"):
        """A request as `token` (default: the admin); HTTPError for an error status."""
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": f"Bearer {token or self.admin_token}"}
        if data is not None:
            headers["Content-Type"] = content_type
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers=headers)
        with urllib.request.urlopen(request, context=self.ssl_context(), timeout=30) as r:
            answer = r.read()
        return answer if raw else json.loads(answer or b"null")

    def kubeconfig(self, token: str, name: str) -> Path:
        """A kubeconfig file that authenticates with `token`."""
        path = self.root / f"{name}.kubeconfig"
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": name,
            "clusters": [{"name": "test", "cluster": {
                "server": self.url, "certificate-authority": str(self.authority.ca_file)}}],
            "users": [{"name": name, "user": {"token": token}}],
            "contexts": [{"name": name, "context": {"cluster": "test", "user": name}}],
        }))
        path.chmod(0o600)
        return path

    def service_account_token(self, namespace: str, name: str, seconds: int = 3600) -> str:
        """A real token of a ServiceAccount (created if missing), as the kubelet asks for."""
        with contextlib.suppress(urllib.error.HTTPError):  # 409: it exists
            self.request("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts",
                         {"metadata": {"name": name}})
        answer = self.request(
            "POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
             "spec": {"expirationSeconds": seconds}})
        return answer["status"]["token"]

    def ensure_namespace(self, name: str, labels: dict[str, str] | None = None) -> None:
        with contextlib.suppress(urllib.error.HTTPError):
            self.request("POST", "/api/v1/namespaces",
                         {"metadata": {"name": name, "labels": labels or {}}})
        deadline = time.monotonic() + 30
        while True:  # admission needs the namespace's default ServiceAccount
            with contextlib.suppress(urllib.error.HTTPError):
                self.get(f"/api/v1/namespaces/{name}/serviceaccounts/default")
                return
            assert time.monotonic() < deadline, f"namespace {name} has no default ServiceAccount"
            time.sleep(0.2)


def environment(control_plane: ControlPlane) -> dict[str, str]:
    """Environment for kubectl, kopf and the kubernetes client as the admin."""
    return {**os.environ, "KUBECONFIG": str(control_plane.admin_kubeconfig)}
