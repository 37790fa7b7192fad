"""Running it: autoconfig/autodiscover tell the truth, metrics and health reflect reality."""

from __future__ import annotations

import json
import poplib
import signal
import smtplib
import socket
import urllib.error
import urllib.request
import xml.etree.ElementTree as ElementTree
from typing import Any, Callable

import pytest

from mailappliance.smtp.replies import RELAY_DENIED
from tests.conditions import paced, wait_until
from tests.daemon import Appliance, free_port
from tests.replies import answered


@pytest.fixture
def running(appliance: Callable[..., Appliance], pki: Any) -> Appliance:
    instance = appliance(pki=pki, start=False)
    assert instance.admin("user", "add", "alice@example.org", password="alice-password").returncode == 0
    instance.start()
    return instance


def http(instance: Appliance, listener: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    url = f"http://127.0.0.1:{instance.ports[listener]}{path}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def check_offer(instance: Appliance, protocol: str, port: int, socket_type: str) -> None:
    """Connect as the document says and log in with the password, as a mail client would."""
    context = instance.client_context()
    if protocol == "pop3":
        client = poplib.POP3_SSL("127.0.0.1", port, context=context, timeout=10) if socket_type == "SSL" \
            else poplib.POP3("127.0.0.1", port, timeout=10)
        if socket_type == "STARTTLS":
            assert "STLS" in client.capa()
            client.stls(context=context)
        client.user("alice@example.org")
        client.pass_("alice-password")
        client.quit()
    else:
        smtp = smtplib.SMTP_SSL("127.0.0.1", port, context=context, timeout=10) if socket_type == "SSL" \
            else smtplib.SMTP("127.0.0.1", port, timeout=10)
        if socket_type == "STARTTLS":
            smtp.starttls(context=context)
        smtp.login("alice@example.org", "alice-password")
        smtp.quit()


def test_autoconfig_describes_what_the_listeners_offer(running: Appliance) -> None:
    """Autoconfig lists exactly the TLS listeners, each working as described; a foreign domain gets 404."""
    for path in ("/.well-known/autoconfig/mail/config-v1.1.xml",
                 "/mail/config-v1.1.xml?emailaddress=alice%40example.org"):
        status, body = http(running, "autoconfig", path)
        assert status == 200
        provider = ElementTree.fromstring(body).find("emailProvider")
        assert provider is not None and provider.findtext("domain") == "example.org"
        servers = provider.findall("incomingServer") + provider.findall("outgoingServer")
        seen = set()
        for server in servers:
            assert server.findtext("hostname") == "mx.test.example"
            assert "password-cleartext" in [a.text for a in server.findall("authentication")]
            port, socket_type = int(server.findtext("port")), server.findtext("socketType")
            check_offer(running, server.get("type"), port, socket_type)
            seen.add((server.get("type"), port, socket_type))
        assert seen == {("pop3", running.ports["pop3s"], "SSL"), ("pop3", running.ports["pop3"], "STARTTLS"),
                        ("smtp", running.ports["submissions"], "SSL"),
                        ("smtp", running.ports["submission"], "STARTTLS")}
        outgoing = provider.find("outgoingServer")
        assert "TLS-client-cert" in [a.text for a in outgoing.findall("authentication")]
    assert http(running, "autoconfig", "/mail/config-v1.1.xml?emailaddress=x%40elsewhere.example")[0] == 404


def test_autodiscover_pox(running: Appliance) -> None:
    """Autodiscover offers POP3 and SMTP over implicit TLS, the address as login, and it works; junk gets 400."""
    request = (b'<?xml version="1.0" encoding="utf-8"?><Autodiscover xmlns="http://schemas.microsoft.com/'
               b'exchange/autodiscover/outlook/requestschema/2006"><Request><EMailAddress>alice@example.org'
               b'</EMailAddress><AcceptableResponseSchema>http://schemas.microsoft.com/exchange/autodiscover/'
               b'outlook/responseschema/2006a</AcceptableResponseSchema></Request></Autodiscover>')
    status, body = http(running, "autoconfig", "/autodiscover/autodiscover.xml", request)
    assert status == 200
    ns = {"r": "http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a"}
    protocols = ElementTree.fromstring(body).findall(".//r:Protocol", ns)
    offered = {p.findtext("r:Type", namespaces=ns): (int(p.findtext("r:Port", namespaces=ns)),
                                                     p.findtext("r:Encryption", namespaces=ns),
                                                     p.findtext("r:LoginName", namespaces=ns))
               for p in protocols}
    assert offered == {"POP3": (running.ports["pop3s"], "SSL", "alice@example.org"),
                       "SMTP": (running.ports["submissions"], "SSL", "alice@example.org")}
    check_offer(running, "pop3", running.ports["pop3s"], "SSL")
    assert http(running, "autoconfig", "/autodiscover/autodiscover.xml", b"<junk")[0] == 400


def metric(text: str, name: str, **labels: str) -> float:
    rendered = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    prefix = f"{name}{{{rendered}}} " if labels else f"{name} "
    return sum(float(line[len(prefix):]) for line in text.splitlines() if line.startswith(prefix))


def test_metrics_reflect_a_scripted_session(running: Appliance) -> None:
    """/metrics counts exactly a script's failed logins, accepted message, relay refusal and sessions."""
    with smtplib.SMTP("127.0.0.1", running.ports["submission"], timeout=10) as smtp:
        smtp.starttls(context=running.client_context())
        with pytest.raises(smtplib.SMTPAuthenticationError):
            smtp.login("alice", "wrong-password")
    with smtplib.SMTP("127.0.0.1", running.ports["mx"], timeout=10) as smtp:
        smtp.ehlo("client.example.net")
        assert smtp.sendmail("friend@example.net", ["alice@example.org"], b"Subject: m\r\n\r\nx\r\n") == {}
        smtp.mail("friend@example.net")
        assert answered(smtp.rcpt("victim@elsewhere.example"), RELAY_DENIED)
    status, body = http(running, "metrics", "/metrics")
    text = body.decode()
    assert status == 200
    assert metric(text, "mailappliance_auth_total", mechanism="PLAIN", protocol="smtp", result="failed") == 1
    assert metric(text, "mailappliance_auth_total", mechanism="LOGIN", protocol="smtp", result="failed") == 1
    assert metric(text, "mailappliance_messages_accepted_total", role="mx") == 1
    assert metric(text, "mailappliance_messages_refused_total", reason="relay_denied") == 1
    assert metric(text, "mailappliance_sessions_total", role="mx") == 1  # the fixture waits for "ready", no probe
    assert metric(text, "mailappliance_queue_messages") == 0
    assert metric(text, "mailappliance_directory_requests_total", operation="authenticate", result="ok") == 2
    assert "# TYPE mailappliance_auth_total counter" in text


def test_health_says_whether_directory_and_spool_work(appliance: Callable[..., Appliance], slapd: Any) -> None:
    """/health is 200 while directory and spool work, 503 naming the directory while slapd is down, 200 again after."""
    instance = appliance(backend="ldap", slapd=slapd)
    status, body = http(instance, "metrics", "/health")
    assert status == 200 and b'"healthy": true' in body
    slapd.stop()
    try:
        status, body = http(instance, "metrics", "/health")
        assert status == 503 and b'"spool": "ok"' in body and b'"directory": "error' in body
    finally:
        slapd.start()
    assert http(instance, "metrics", "/health")[0] == 200


def test_check_config_and_test_login(appliance: Callable[..., Appliance], slapd: Any) -> None:
    """check-config and test-login report the directory, a good and a bad login, and exit 75/1 while slapd is down."""
    instance = appliance(backend="ldap", slapd=slapd, start=False)
    assert instance.admin("user", "add", "alice@example.org", password="alice-password").returncode == 0
    checked = instance.admin("check-config")
    assert checked.returncode == 0, checked.stdout
    assert "ok   directory  ldap directory at ldap://127.0.0.1" in checked.stdout
    good = instance.admin("test-login", "alice@example.org", password="alice-password")
    assert good.returncode == 0 and "ok: alice@example.org is uid=alice" in good.stdout
    bad = instance.admin("--json", "test-login", "alice", password="nope-nope")
    assert bad.returncode == 1 and '"refused": "unknown login or wrong password"' in bad.stdout
    slapd.stop()
    try:
        down = instance.admin("test-login", "alice", password="alice-password")
        assert down.returncode == 75 and "temporary failure" in down.stdout
        failing = instance.admin("check-config")
        assert failing.returncode == 1 and "FAIL directory" in failing.stdout
    finally:
        slapd.start()


def test_screening_commands_change_the_running_daemon(appliance: Callable[..., Appliance], tmp_path: Any) -> None:
    """screening add/remove change what the running daemon refuses; bad or duplicate entries fail."""
    lists = tmp_path / "screening.toml"
    lists.write_text("[block]\nnetworks = []\n")
    instance = appliance(extra={"screening": {"file": str(lists), "refuse_at": "connect"}})
    added = instance.admin("screening", "add", "block.networks", "127.0.0.77/32")
    assert added.returncode == 0, added.stderr
    assert instance.admin("screening", "add", "block.networks", "127.0.0.77/32").returncode == 1
    assert instance.admin("screening", "add", "block.networks", "not-a-network").returncode == 1
    assert "127.0.0.77/32" in instance.admin("screening", "list").stdout

    def greeting() -> bytes:
        with socket.create_connection(("127.0.0.1", instance.ports["mx"]), timeout=10,
                                      source_address=("127.0.0.77", 0)) as sock:
            return sock.makefile("rb").readline()

    # The daemon looks at the file at most once a second, when a client connects;
    # each look costs a connection, which connections_per_minute counts.
    refused = b"554 5.7.1 mx.test.example Access denied\r\n"
    wait_until(paced(lambda: greeting() == refused, 0.25), timeout=10, what="the added block in force")
    assert "screening lists reloaded from " in instance.log()
    assert instance.admin("screening", "remove", "block.networks", "127.0.0.77/32").returncode == 0
    wait_until(paced(lambda: greeting().startswith(b"220 "), 0.25), timeout=10, what="the block removed")


def test_sighup_applies_safe_changes_and_names_the_rest(appliance: Callable[..., Appliance]) -> None:
    """SIGHUP applies limits and log level, names listener changes as needing a restart; bad TOML is refused."""
    instance = appliance(extra={"limits": {"concurrent_per_address": 50}})
    with socket.create_connection(("127.0.0.1", instance.ports["mx"]), timeout=10) as probe:
        assert probe.recv(1024).startswith(b"220 ")  # its "connect to" line, at info, is in the log now
    text = instance.config_path.read_text()
    text = text.replace("concurrent_per_address = 50", "concurrent_per_address = 1")
    text = text.replace(f"port = {instance.ports['pop3s']}", f"port = {free_port()}")  # not +1: a neighbour's
    instance.config_path.write_text(text + '[logging]\nlevel = "warn"\n')
    assert instance.process is not None
    instance.process.send_signal(signal.SIGHUP)
    wait_until(lambda: "configuration reloaded" in instance.log(), what="the reloaded config logged")
    assert "SIGHUP: configuration reloaded; applied: limits, log_level; changed but needing a restart: " \
           "listeners" in instance.log()
    before = instance.log().count("] connect to mx ")
    assert before > 0
    first = socket.create_connection(("127.0.0.1", instance.ports["mx"]), timeout=10)
    try:
        assert first.recv(1024).startswith(b"220")
        with socket.create_connection(("127.0.0.1", instance.ports["mx"]), timeout=10) as second:
            assert second.recv(1024).startswith(b"421 4.7.0")  # the new limit is in force
    finally:
        first.close()
    assert instance.log().count("] connect to mx ") == before  # info lines are filtered now
    assert "limit concurrent_per_address reached" not in instance.log()
    instance.config_path.write_text("[server\n")
    instance.process.send_signal(signal.SIGHUP)
    wait_until(lambda: "configuration NOT reloaded" in instance.log(), what="the refused config logged")
    assert "(syntax): not valid TOML" in instance.log()
    instance.config_path.write_text(text + '[logging]\nlevel = "info"\n')  # and back: info lines are built again
    instance.process.send_signal(signal.SIGHUP)
    wait_until(lambda: instance.log().count("configuration reloaded") >= 2, what="the level set back to info")
    with socket.create_connection(("127.0.0.1", instance.ports["mx"]), timeout=10) as third:
        assert third.recv(1024).startswith(b"220")
    wait_until(lambda: instance.log().count("] connect to mx ") > before, what="info lines logged again")


def test_json_log_lines_carry_the_session(appliance: Callable[..., Appliance], tmp_path: Any) -> None:
    """JSON log lines carry the session id, so a refusal leads back to its connection."""
    events = tmp_path / "events.jsonl"
    instance = appliance(extra={"logging": {"json_file": str(events)}})
    with smtplib.SMTP("127.0.0.1", instance.ports["mx"], timeout=10) as smtp:
        smtp.ehlo("client.example.net")
        smtp.mail("friend@example.net")
        assert answered(smtp.rcpt("victim@elsewhere.example"), RELAY_DENIED)
    instance.stop()
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    refused = [e for e in lines if e["event"].startswith("relay refused ")]
    assert len(refused) == 1
    assert refused[0]["rcpt"] == "victim@elsewhere.example" and refused[0]["reason"] == "relay denied"
    session = refused[0]["session"]
    assert any(e.get("session") == session and e["event"].startswith("connect to ") for e in lines)
