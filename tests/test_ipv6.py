"""IPv6 wherever a listener or a client address appears, tested on ::1: every listener on
::1, mail in and out over IPv6 (an AAAA-only MX), Received with an IPv6 address literal,
autoconfig over IPv6, screening networks and limits for IPv6 clients, and a dual-stack
listener on "::" that sees IPv4 clients as IPv4."""

from __future__ import annotations

import poplib
import smtplib
import socket
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mailappliance.config import ConfigError, parse_config
from mailappliance.smtp import replies
from mailappliance.web import Offer, offers
from tests.conditions import wait_until
from tests.daemon import Appliance, free_port
from tests.replies import answered

pytest_plugins = ["tests.remote"]

MESSAGE = b"From: bob@example.org\r\nSubject: over IPv6\r\n\r\nhello\r\n"


def test_every_listener_on_ipv6_loopback(appliance: Callable[..., Appliance], pki: Any, dns_server: Any,
                                         smtp_receiver: Any) -> None:
    """Listeners on ::1: the MX takes mail from an IPv6 client (Received names [IPv6:::1]), POP3S
    gives it back, autoconfig answers over IPv6, and submitted mail goes out to an AAAA-only MX."""
    port = free_port()
    dns_server.serve({"v6.example": ["MX('v6.example', 10, 'mx.v6.example')", "AAAA('mx.v6.example', '::1')"]})
    receiver = smtp_receiver(host="::1", port=port)
    instance = appliance(pki=pki, start=False, address="::1", extra={"queue": {
        "resolver": dns_server.address, "smtp_port": port, "scan_interval": 0.2, "connect_timeout": 2,
        "command_timeout": 10}})
    assert instance.admin("user", "add", "bob@example.org", password="bob-password").returncode == 0
    instance.start()
    with smtplib.SMTP("::1", instance.ports["mx"], timeout=10) as smtp:
        smtp.ehlo("[IPv6:::1]")
        assert smtp.sendmail("someone@remote.example", ["bob@example.org"], MESSAGE) == {}
    client = poplib.POP3_SSL("::1", instance.ports["pop3s"], timeout=10, context=instance.client_context())
    try:
        client.user("bob")
        client.pass_("bob-password")
        stored = b"\r\n".join(client.retr(1)[1])
    finally:
        client.quit()
    assert b"Received: from [IPv6:::1] (" in stored and b" [IPv6:::1])\r\n" in stored
    url = f"http://[::1]:{instance.ports['autoconfig']}/mail/config-v1.1.xml?emailaddress=bob@example.org"
    with urllib.request.urlopen(url, timeout=10) as response:
        xml = response.read().decode()
    assert xml.count("<outgoingServer") == 2 and f"<port>{instance.ports['submissions']}</port>" in xml
    with smtplib.SMTP_SSL("::1", instance.ports["submissions"], timeout=10,
                          context=instance.client_context()) as smtp:
        smtp.login("bob", "bob-password")
        assert smtp.sendmail("bob@example.org", ["friend@v6.example"], MESSAGE) == {}
    [received] = receiver.wait_for(1)
    assert received.rcpt_tos == ["friend@v6.example"]
    wait_until(lambda: "relay=mx.v6.example[::1]" in instance.log(), what="the delivery line naming [::1]")


def test_dual_stack_listener_screening_and_limits_for_ipv6_clients(appliance: Callable[..., Appliance],
                                                                   tmp_path: Path) -> None:
    """Listeners on "::": an IPv4 client is 127.0.0.1 (not ::ffff:127.0.0.1) for screening and logs;
    a blocked IPv6 network (::1/128) refuses the IPv6 client at RCPT while postmaster@ stays open; the
    IPv6 client's connections count against its /64."""
    lists = tmp_path / "screening.toml"
    lists.write_text('[block]\nnetworks = ["::1/128"]\n')
    instance = appliance(start=False, address="::", extra={
        "screening": {"file": str(lists), "apply_to": ["mx"]}, "server": {"postmaster": "bob@example.org"},
        "limits": {"connections_per_minute": 10}})
    assert instance.admin("user", "add", "bob@example.org", password="bob-password").returncode == 0
    instance.start()
    with smtplib.SMTP("::1", instance.ports["mx"], timeout=10) as smtp:
        smtp.ehlo("client.example.net")
        smtp.mail("someone@remote.example")
        assert answered(smtp.rcpt("bob@example.org"), replies.CLIENT_REFUSED)
        assert smtp.rcpt("postmaster@example.org")[0] == 250
    with smtplib.SMTP("127.0.0.1", instance.ports["mx"], timeout=10) as smtp:
        smtp.ehlo("client.example.net")
        smtp.mail("someone@remote.example")
        assert smtp.rcpt("bob@example.org")[0] == 250
    log = instance.log()
    assert "client=[127.0.0.1]" in log and "::ffff:" not in log
    assert "client=[::1] screened at client: refuse rule=block.networks value='::1/128'" in log
    refused = []
    for _ in range(10):  # one connection from ::1 was made already
        with socket.create_connection(("::1", instance.ports["mx"]), timeout=10) as s:
            refused.append(s.recv(200))
    assert refused[-1].startswith(b"421 4.7.0 ") and all(r.startswith(b"220 ") for r in refused[:-1])
    with socket.create_connection(("127.0.0.1", instance.ports["mx"]), timeout=10) as s:
        assert s.recv(200).startswith(b"220 ")  # IPv4 is another network


@pytest.mark.parametrize("first, second", [("0.0.0.0", "::"), ("::", "127.0.0.1"), ("::", "::1"),
                                           ("0.0.0.0", "192.0.2.1")])
def test_listeners_that_cannot_share_a_port_are_a_config_error(first: str, second: str) -> None:
    """A wildcard listener takes its port for every address ("::" for IPv4 too): a second listener
    on that port is refused in the config, naming both, instead of failing to bind at start."""
    data = {"server": {"local_domains": ["example.org"]},
            "listeners": [{"name": "a", "role": "mx", "address": first, "port": 2525},
                          {"name": "b", "role": "mx", "address": second, "port": 2525}]}
    with pytest.raises(ConfigError) as e:
        parse_config(Path("m.toml"), data)
    assert "listeners[1].address" in str(e.value) and "cannot both listen on port 2525" in str(e.value)
    data["listeners"][1]["address"] = "::1" if ":" not in first else "127.0.0.1"
    data["listeners"][1]["port"] = 2526
    parse_config(Path("m.toml"), data)


def test_autoconfig_names_a_port_once_whatever_addresses_it_listens_on() -> None:
    """Submission on 127.0.0.1:587 and on [::1]:587 is one server in autoconfig, not two."""
    data = {"server": {"local_domains": ["example.org"]},
            "listeners": [{"name": "s4", "role": "submission", "address": "127.0.0.1", "port": 587},
                          {"name": "s6", "role": "submission", "address": "::1", "port": 587}]}
    assert offers(parse_config(Path("m.toml"), data)) == [Offer("smtp", 587, "STARTTLS")]
