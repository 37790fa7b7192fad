"""Running the real ``twistd -n mailappliance`` as a subprocess, as an admin would.

The fixture ``appliance`` is a factory: ``appliance(backend="ldap")`` writes a
config into a temp dir (free loopback ports, storage there too), starts the
daemon with the ``twistd`` of the running Python (the package must be
installed, which ``make test`` does), and waits until every listener answers.
"""

from __future__ import annotations

import fcntl
import os
import poplib
import random
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Iterator

import pytest

from tests.conditions import wait_until

BIN = Path(sys.executable).parent


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_EPHEMERAL_LOW = _ephemeral_low()
_handed_out: set[int] = set()
_PORT_BLOCK = 32
_PORT_LOCKS = Path(tempfile.gettempdir()) / f"mailappliance-test-ports.{os.getuid()}"
_held_blocks: list[int] = []  # lock file descriptors, held until this process ends


def _own_ports() -> Iterator[int]:
    """Candidate ports, in no order (a test may move a listener to port + 1), from blocks of
    32 that no other test or bench process on this machine holds: each block is an flock on
    a file in ``_PORT_LOCKS``, held until this process exits.  Several pytest runs at once
    (engineers, CI) otherwise picked the same "free" port in the second between the bind
    check and the daemon's bind, and the daemon exited with "Address already in use"."""
    _PORT_LOCKS.mkdir(mode=0o700, exist_ok=True)
    blocks = list(range(10000, _EPHEMERAL_LOW, _PORT_BLOCK))
    random.shuffle(blocks)
    for start in blocks:
        fd = os.open(_PORT_LOCKS / str(start), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        _held_blocks.append(fd)
        ports = list(range(start, min(start + _PORT_BLOCK, _EPHEMERAL_LOW)))
        random.shuffle(ports)
        yield from ports


_next_port = _own_ports()


def first_bindable(candidates: Iterable[int], exclude: Collection[int] = ()) -> int | None:
    """The first of ``candidates`` (not in ``exclude``) that loopback can bind now."""
    for port in candidates:
        if port in exclude:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    return None


def free_port() -> int:
    """A free loopback port for a test server: below the ephemeral range, so no
    client socket takes it meanwhile (binding port 0 hands out ports that
    outgoing connections also use), and never the same twice in one run."""
    port = first_bindable(_next_port, _handed_out)
    if port is None:
        raise RuntimeError(f"no free port left between 10000 and {_EPHEMERAL_LOW}")
    _handed_out.add(port)
    return port


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table; keys quoted (domains have dots)
        return "{" + ", ".join(f"{_toml_value(str(k))} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def toml_table(header: str, values: dict[str, Any]) -> str:
    """``header`` is "[name]" or "[[name]]"."""
    lines = [header] + [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


class Appliance:
    """One daemon instance with its own directory tree and ports."""

    def __init__(self, root: Path, sections: dict[str, dict[str, Any]], listeners: list[dict[str, Any]],
                 pki: Any = None, slapd: Any = None) -> None:
        self.root = root
        self.pki = pki  # the test PKI whose certificates the daemon serves, or None (self-signed)
        self.slapd = slapd  # the slapd of the "ldap" backend, or None
        self.config_path = root / "mailappliance.toml"
        self.log_path = root / "twistd.log"
        self.ports = {listener["name"]: listener["port"] for listener in listeners}
        text = "".join(toml_table(f"[{name}]", values) for name, values in sections.items())
        text += "".join(toml_table("[[listeners]]", listener) for listener in listeners)
        self.config_path.write_text(text)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def maildir_root(self) -> Path:
        return self.root / "mail"

    def start(self, timeout: float = 30) -> None:
        command = [str(BIN / "twistd"), "-n", "--pidfile=", "--logfile", str(self.log_path),
                   "mailappliance", "--config", str(self.config_path)]
        seen = len(self.log())  # a restart: only a "ready" logged from now on counts
        self.process = subprocess.Popen(command, cwd=self.root, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

        def ready() -> bool:
            """twistd binds every port (privilegedStartService) before the "ready" line is
            logged; waiting for the line instead of probing the ports leaves no probe
            connections behind to count against the per-address limits."""
            assert self.process is not None
            if self.process.poll() is not None:
                output = self.process.stdout.read().decode() if self.process.stdout else ""
                raise RuntimeError(f"mailappliance exited with {self.process.returncode}:\n{output}\n{self.log()}")
            return "mailappliance ready" in self.log()[seen:]

        try:
            wait_until(ready, timeout, what="mailappliance ready")
        except AssertionError:
            raise RuntimeError(f"mailappliance did not open its ports:\n{self.log()}") from None

    def client_context(self, certificate: str | None = None) -> ssl.SSLContext:
        """A client's TLS context that trusts this daemon's certificate (and presents
        the test PKI's ``certificate``, if named); without the test PKI it trusts the
        generated self-signed certificate, whose name is not ours to check."""
        if self.pki is not None:
            return self.pki.client_context(certificate)
        context = ssl.create_default_context(cafile=str(self.root / "tls" / "server.pem"))
        context.check_hostname = False
        return context

    def pop3(self, login: str, password: str) -> poplib.POP3_SSL:
        """A POP3 session over implicit TLS (the pop3s listener), logged in; a refused
        login raises poplib.error_proto with the server's reply."""
        client = poplib.POP3_SSL("127.0.0.1", self.ports["pop3s"], timeout=10, context=self.client_context())
        try:
            client.user(login)
            client.pass_(password)
        except BaseException:
            client.close()
            raise
        return client

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill9(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def admin(self, *args: str, password: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``mailappliance-admin`` against this instance's config."""
        command = [str(BIN / "mailappliance-admin"), "--config", str(self.config_path), *args]
        if password is not None:
            command.append("--password-stdin")
        return subprocess.run(command, input=(password or "") + "\n", capture_output=True, text=True,
                              timeout=60)


@pytest.fixture
def appliance(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., Appliance]]:
    started: list[Appliance] = []

    def make(backend: str = "ldif", slapd: Any = None, cache_ttl: float = 60, pki: Any = None,
             plaintext_pop3: bool = False, extra: dict[str, dict[str, Any]] | None = None,
             start: bool = True, address: str = "127.0.0.1") -> Appliance:
        """A daemon with every listener; ``pki`` gives it the test CA's certificates
        (otherwise it generates a self-signed one).  POP3 logins need TLS, as in
        production; ``plaintext_pop3=True`` allows them in clear on the ``pop3``
        listener, for tests about plaintext login itself."""
        root = tmp_path / f"appliance{len(started)}"
        root.mkdir()
        directory: dict[str, Any] = {"backend": backend, "ldif_file": str(root / "users.ldif")}
        sections: dict[str, dict[str, Any]] = {
            "server": {"hostname": "mx.test.example", "local_domains": ["example.org", "example.net"]},
            "storage": {"maildir_root": str(root / "mail"), "spool_dir": str(root / "spool")},
            "auth": {"cache_ttl": cache_ttl},
            "directory": directory,
            "tls": {"certificate": str(root / "tls" / "server.pem"), "private_key": str(root / "tls" / "server.key")},
        }
        if pki is not None:
            sections["tls"] = {"certificate": str(pki.server_cert), "private_key": str(pki.server_key),
                               "client_ca": str(pki.client_ca), "client_ca_key": str(pki.client_ca_key),
                               "generate_self_signed": False}
        if backend == "ldap":
            sections["directory.ldap"] = {
                "urls": [slapd.url], "base_dn": slapd.base_dn, "bind_dn": slapd.bind_dn,
                "bind_password": slapd.bind_password, "admin_bind_dn": slapd.admin_dn,
                "admin_bind_password": slapd.admin_password, "timeout": 2,
            }
        for name, values in (extra or {}).items():
            sections.setdefault(name, {}).update(values)
        listeners = [  # ``address``: every listener's, e.g. "::1" or "::" (dual stack)
            {"name": role, "role": role, "address": address, "port": free_port()}
            for role in ("mx", "submission", "submissions", "pop3", "pop3s", "autoconfig", "metrics")
        ]
        for listener in listeners:
            if listener["role"] == "pop3":
                listener["allow_plaintext_auth"] = plaintext_pop3
        instance = Appliance(root, sections, listeners, pki=pki, slapd=slapd)
        started.append(instance)
        if start:
            instance.start()
        return instance

    yield make
    for instance in started:
        instance.stop()
    if any(rep.failed for rep in getattr(request.node, "_reports", [])):
        for instance in started:
            print(f"--- log of {instance.root} ---\n{instance.log()}")


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    """Keep each phase's report on the item so fixtures can print logs on failure."""
    outcome = yield
    report = outcome.get_result()
    item.__dict__.setdefault("_reports", []).append(report)


os.environ.setdefault("PYTHONUNBUFFERED", "1")
