"""Issue 11, finding 8: login names could be enumerated by timing.

A known login cost an Argon2 check (median 152 ms), an unknown one was refused
in 1 ms.  Now a login that finds nobody (or a subscriber without a usable
hash) is checked against a dummy Argon2 hash made with the same parameters
(LDIF), or costs a refused bind (LDAP), before it is refused.

These compare medians of interleaved attempts and only ask for the same order
of magnitude (at least half), a behaviour check rather than a speed limit.
"""

from __future__ import annotations

import socket
import statistics
import threading
import time
from typing import Any, Callable

import attrs

from mailappliance.directory.ldap import LdapStore
from mailappliance.directory.threaded import Directory
from tests.daemon import Appliance

ROUNDS = 15
NO_THROTTLE = {"failures_before_delay": 1000, "address_lock_after": 100000, "account_lock_after": 100000}


class Pop3Client:
    """One plaintext POP3 session that tries USER/PASS again and again (RFC 1939 allows it)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.reader = self.sock.makefile("rb")
        banner = self.reader.readline()
        assert banner.startswith(b"+OK"), banner

    def refusal_seconds(self, login: str, password: str) -> float:
        """Seconds from sending PASS to the -ERR that refuses it."""
        self.sock.sendall(f"USER {login}\r\n".encode())
        assert self.reader.readline().startswith(b"+OK")
        started = time.perf_counter()
        self.sock.sendall(f"PASS {password}\r\n".encode())
        reply = self.reader.readline()
        elapsed = time.perf_counter() - started
        assert reply.startswith(b"-ERR [AUTH]"), reply
        return elapsed

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def medians(measure: Callable[[str], float], logins: list[str]) -> dict[str, float]:
    """Median time per login, the logins measured in turn, round after round (drift hits them alike)."""
    samples: dict[str, list[float]] = {login: [] for login in logins}
    for _ in range(ROUNDS):
        for login in logins:
            samples[login].append(measure(login))
    return {login: statistics.median(times) for login, times in samples.items()}


def test_unknown_disabled_and_passwordless_logins_cost_what_a_known_one_costs(
        appliance: Callable[..., Appliance]) -> None:
    """Through the real daemon (POP3, LDIF): a wrong password for alice, an unknown login, a disabled
    subscriber and one without a password are refused after comparable times."""
    instance = appliance(plaintext_pop3=True, extra={"auth": {"cache_ttl": 0, **NO_THROTTLE}})  # raw POP3 client
    assert instance.admin("user", "add", "alice@example.org", password="alice-password").returncode == 0
    assert instance.admin("user", "add", "dora@example.org", password="dora-password").returncode == 0
    assert instance.admin("user", "disable", "dora").returncode == 0
    assert instance.admin("user", "add", "cert@example.org", "--no-password").returncode == 0
    client = Pop3Client(instance.ports["pop3"])
    try:
        found = medians(lambda login: client.refusal_seconds(login, "wrong-password"),
                        ["alice", "nobody-here", "dora", "cert"])
    finally:
        client.close()
    known = found["alice"]
    for login in ("nobody-here", "dora", "cert"):
        assert found[login] >= 0.5 * known, (login, found)


class SlowLink:
    """A TCP relay to slapd that adds ``delay`` to every new connection, as a directory
    server across a network does (the bind that checks a password opens one)."""

    def __init__(self, target: tuple[str, int], delay: float) -> None:
        self.target, self.delay = target, delay
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"ldap://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        time.sleep(self.delay)
        with client, socket.create_connection(self.target) as server:
            for sock in (client, server):  # a relay must not add Nagle's delays to the LDAP replies
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            def pump(source: socket.socket, sink: socket.socket) -> None:
                try:
                    while data := source.recv(65536):
                        sink.sendall(data)
                except OSError:
                    pass
                for sock in (source, sink):
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

            other = threading.Thread(target=pump, args=(server, client), daemon=True)
            other.start()
            pump(client, server)
            other.join()

    def close(self) -> None:
        self.listener.close()


def test_ldap_unknown_login_costs_what_a_refused_bind_costs(slapd: Any) -> None:
    """LDAP: a login that finds nobody costs a refused bind on a fresh connection too, like a wrong
    password for a subscriber (slapd behind a relay that makes each new connection take 20 ms)."""
    link = SlowLink(("127.0.0.1", slapd.port), delay=0.02)
    store = LdapStore(attrs.evolve(slapd.settings(), urls=(link.url,)))
    try:
        store.add_subscriber("alice", "alice@example.org", "alice-password")
        directory = Directory(store, reactor=None)  # the call the checker's pool thread makes

        def refusal_seconds(login: str) -> float:
            started = time.perf_counter()
            assert directory._authenticate(login, "wrong-password") is None
            return time.perf_counter() - started

        found = medians(refusal_seconds, ["alice", "nobody-here"])
        assert found["nobody-here"] >= 0.5 * found["alice"], found
    finally:
        store.close()
        link.close()
