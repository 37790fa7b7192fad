"""Finding 11: nothing a client sends can start a line of its own in the log."""

from __future__ import annotations

import re
import socket
from typing import Callable

from tests.conditions import wait_until
from tests.daemon import Appliance

PLANTED = "auth failed: login='root' mechanism=USER client=[203.0.113.7]"
# Every character some log reader takes for a line break (str.splitlines, terminals, less).
BREAKS = ["\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]
LINE_BREAK = re.compile("[\n" + "".join(BREAKS) + "]")


def test_crafted_pop3_and_smtp_input_cannot_plant_log_lines(appliance: Callable[..., Appliance]) -> None:
    """Logins and addresses full of line-break characters are logged escaped:
    no line of the log, however it is split, starts with the planted text."""
    instance = appliance(plaintext_pop3=True, extra={"auth": {  # logins in clear, no delays: it is about the log
        "failures_before_delay": 1000, "address_lock_after": 1000, "account_lock_after": 1000}})
    with socket.create_connection(("127.0.0.1", instance.ports["pop3"]), timeout=10) as pop3:
        pop3.recv(1024)
        for n, brk in enumerate(BREAKS):
            pop3.sendall(f"USER x{brk}{PLANTED}\r\nPASS wrong{n}\r\n".encode())
        pop3.sendall(b"QUIT\r\n")
        while pop3.recv(65536):
            pass
    with socket.create_connection(("127.0.0.1", instance.ports["mx"]), timeout=10) as smtp:
        commands = "EHLO client.example.net\r\nMAIL FROM:<s@example.net>\r\n"
        commands += "".join(f"RCPT TO:<a{brk}{PLANTED}@example.org>\r\nHELO x{brk}{PLANTED}\r\n"
                            for brk in BREAKS)
        smtp.sendall((commands + "QUIT\r\n").encode())
        while smtp.recv(65536):
            pass
    wait_until(lambda: instance.log().count("login failed") >= len(BREAKS), what="every failed login logged")
    lines = LINE_BREAK.split(instance.log())
    planted = [line for line in lines if line.startswith(PLANTED) or line.split(" ", 2)[-1].startswith(PLANTED)]
    assert planted == [], planted[:3]
    assert "\\x0b" in instance.log() or "\\u2028" in instance.log()  # escaped, not dropped
