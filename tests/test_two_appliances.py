"""Two appliances as one service (issue 17): two daemons on loopback, a syncrepl
provider/consumer pair of real slapds (appliance A reads the provider, B the
consumer), one shared Maildir root and one real redis-server for their state."""

from __future__ import annotations

import base64
import json
import poplib
import smtplib
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.conditions import wait_until
from tests.daemon import Appliance, free_port, toml_table
from tests.redis_server import RedisServer
from tests.slapd import Slapd

MESSAGES_PER_HOUR = 3
ACCOUNT_LOCK_AFTER = 5
LOCK_TTL = 3  # seconds: a crashed host's POP3 lock is gone this long after its last refresh


def _appliance(root: Path, name: str, shared_mail: Path, reads: Slapd, provider: Slapd, redis: RedisServer,
               pki: Any) -> Appliance:
    root = root / name
    root.mkdir()
    sections: dict[str, dict[str, Any]] = {
        "server": {"hostname": f"{name}.test.example", "local_domains": ["example.org"]},
        "storage": {"maildir_root": str(shared_mail), "spool_dir": str(root / "spool")},
        "auth": {"cache_ttl": 0, "account_lock_after": ACCOUNT_LOCK_AFTER, "address_lock_after": 10_000,
                 "failures_before_delay": 1000},
        "directory": {"backend": "ldap"},
        "directory.ldap": {"urls": [reads.url], "base_dn": reads.base_dn, "bind_dn": reads.bind_dn,
                           "bind_password": reads.bind_password, "admin_bind_dn": provider.admin_dn,
                           "admin_bind_password": provider.admin_password, "timeout": 2},
        "tls": {"certificate": str(pki.server_cert), "private_key": str(pki.server_key),
                "generate_self_signed": False},
        "limits": {"messages_per_hour": MESSAGES_PER_HOUR, "connections_per_minute": 10_000},
        "state": {"redis": redis.url, "timeout": 0.5, "probe_interval": 0.2, "lock_ttl": LOCK_TTL},
    }
    listeners = [{"name": role, "role": role, "address": "127.0.0.1", "port": free_port()}
                 for role in ("mx", "submissions", "pop3s", "metrics")]
    return Appliance(root, sections, listeners, pki=pki, slapd=reads)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, replicated_slapds: tuple[Slapd, Slapd],
         redis_server: RedisServer, pki: Any) -> Iterator[tuple[Appliance, Appliance]]:
    provider, consumer = replicated_slapds
    redis_server.start()
    redis_server.command(b"FLUSHALL")
    root = tmp_path_factory.mktemp("two-appliances")
    shared_mail = root / "shared-mail"
    a = _appliance(root, "a", shared_mail, provider, provider, redis_server, pki)
    b = _appliance(root, "b", shared_mail, consumer, provider, redis_server, pki)
    try:
        a.start()
        b.start()
        yield a, b
    finally:
        for instance in (a, b):
            instance.stop()


def add_user(pair: tuple[Appliance, Appliance], name: str) -> str:
    """A subscriber added through appliance A's admin tool (it writes to the provider);
    returns the address once the consumer that B reads has it too."""
    a, b = pair
    address = f"{name}@example.org"
    result = a.admin("user", "add", address, password=f"{name}-password")
    assert result.returncode == 0, result.stderr
    wait_until(lambda: _has_login(b.slapd, name), 15, what=f"{address} on the consumer")
    return address


def _has_login(server: Slapd, uid: str) -> bool:
    with server.admin_connection() as conn:
        return bool(conn.search(server.base_dn, f"(uid={uid})", attributes=[]))


def send(instance: Appliance, user: str, recipients: list[str], password: str | None = None) -> Any:
    """Submit a message as ``user`` over implicit TLS: {} when accepted, else the smtplib error."""
    with smtplib.SMTP_SSL("127.0.0.1", instance.ports["submissions"], timeout=10,
                          context=instance.client_context()) as smtp:
        try:
            smtp.login(user, password or f"{user}-password")
            return smtp.sendmail(f"{user}@example.org", recipients, b"Subject: x\r\n\r\ny\r\n")
        except smtplib.SMTPException as e:
            return e


def health(instance: Appliance) -> dict[str, Any]:
    url = f"http://127.0.0.1:{instance.ports['metrics']}/health"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        return json.loads(e.read())


def test_the_hourly_limit_holds_across_both_appliances(pair: tuple[Appliance, Appliance]) -> None:
    """A subscriber's messages_per_hour counts every message, whichever appliance took it."""
    a, b = pair
    add_user(pair, "hourly")
    assert send(a, "hourly", ["alice@remote.example"]) == {}
    assert send(b, "hourly", ["bob@remote.example"]) == {}
    assert send(a, "hourly", ["carol@remote.example"]) == {}
    for instance in (b, a):
        refused = send(instance, "hourly", ["dave@remote.example"])
        assert isinstance(refused, smtplib.SMTPSenderRefused) and refused.smtp_code == 450
        assert refused.smtp_error.startswith(b"4.7.1 Sending limit reached (messages per hour)")


def test_password_guessing_spread_over_both_locks_at_the_configured_count(pair: tuple[Appliance, Appliance]) -> None:
    """account_lock_after failures in total, alternating appliances, lock the account on both."""
    a, b = pair
    add_user(pair, "target")
    codes = [auth_plain((a, b)[attempt % 2], "target", "guess") for attempt in range(ACCOUNT_LOCK_AFTER)]
    assert codes == [535] * ACCOUNT_LOCK_AFTER
    for instance in (a, b):  # the right password now meets the lock, on either appliance
        assert auth_plain(instance, "target", "target-password") == 454


def auth_plain(instance: Appliance, user: str, password: str) -> int:
    """One AUTH PLAIN attempt (smtplib's login() would try a second mechanism): the reply code."""
    with smtplib.SMTP_SSL("127.0.0.1", instance.ports["submissions"], timeout=10,
                          context=instance.client_context()) as smtp:
        smtp.ehlo()
        response = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        return smtp.docmd("AUTH", f"PLAIN {response}")[0]


def test_a_pop3_session_on_one_appliance_makes_the_other_answer_in_use(pair: tuple[Appliance, Appliance]) -> None:
    """The one-session-per-mailbox lock holds across hosts: [IN-USE] on B while A serves the mailbox."""
    a, b = pair
    add_user(pair, "reader")
    session = a.pop3("reader", "reader-password")
    try:
        with pytest.raises(poplib.error_proto) as refused:
            b.pop3("reader", "reader-password")
        assert refused.value.args[0].startswith(b"-ERR [IN-USE]")
    finally:
        session.quit()
    b.pop3("reader", "reader-password").quit()  # released at QUIT: B serves it now


def test_without_redis_both_keep_delivering_and_share_again_when_it_returns(
        pair: tuple[Appliance, Appliance], redis_server: RedisServer) -> None:
    """Redis stopped: both appliances keep taking mail (degraded, said in /health); Redis back: shared again."""
    a, b = pair
    add_user(pair, "steady")
    redis_server.stop()
    try:
        for instance in (a, b):
            assert send(instance, "steady", ["steady@example.org"]) == {}
            assert health(instance)["state_store"] == "degraded"
            assert health(instance)["healthy"] is True  # degraded, not down
    finally:
        redis_server.start()
    for instance in (a, b):
        wait_until(lambda: health(instance)["state_store"] == "ok", 15, what="the state store shared again")
    assert send(b, "steady", ["steady@example.org"]) == {}
    assert redis_server.keys(), "the reservation went to Redis again"
    assert "state store DEGRADED" in a.log() and "state store shared again" in a.log()
    assert a.log().count("state store DEGRADED") == 1  # once per switch, not once per call


def test_a_user_added_on_the_provider_logs_in_on_the_consumers_appliance(
        pair: tuple[Appliance, Appliance]) -> None:
    """syncrepl carries a new subscriber to the consumer, where appliance B finds it."""
    a, b = pair
    result = a.admin("user", "add", "newcomer@example.org", password="newcomer-password")
    assert result.returncode == 0, result.stderr
    session = wait_until(lambda: _login_or_none(b, "newcomer"), 15, what="newcomer logging in on B")
    session.quit()


def _login_or_none(instance: Appliance, name: str) -> Any:
    try:
        return instance.pop3(name, f"{name}-password")
    except poplib.error_proto:
        return None


def test_a_crashed_appliances_mailbox_lock_expires(pair: tuple[Appliance, Appliance]) -> None:
    """A holds a POP3 session and dies (SIGKILL): B answers [IN-USE] until the lease expires, then serves it."""
    a, b = pair
    add_user(pair, "orphan")
    session = a.pop3("orphan", "orphan-password")
    a.kill9()
    session.sock.close()
    with pytest.raises(poplib.error_proto) as refused:
        b.pop3("orphan", "orphan-password")
    assert refused.value.args[0].startswith(b"-ERR [IN-USE]")
    wait_until(lambda: _login_or_none(b, "orphan"), LOCK_TTL + 10, what="the dead host's lock expiring").quit()
    a.start()  # for whatever runs after
