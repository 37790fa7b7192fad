"""docs/admin.md, walked again by a machine: the shell blocks marked ``<!-- test: run -->``
run as written (issue 12: "every command copy-pasteable as written").

They run in a temporary tree instead of /etc, /var/lib and /var/backups, in a
terminal (the test types the passwords the commands ask for), against a
slapd configured as Debian's package configures a fresh one, and with the
guide's ports moved to free ones.  Then the daemon starts from the config the
guide wrote and the subscriber it added reads her mail.  Blocks marked
``<!-- test: skip: why -->`` install packages, create the system user or
drive systemd; what the skipped install steps leave behind (the config
directory, the screening file, slapd) is made here.
"""

from __future__ import annotations

import os
import poplib
import pty
import re
import select
import shutil
import signal
import socket
import ssl
import subprocess
import time
import tomllib
from pathlib import Path
from typing import Callable

from tests.conditions import wait_until
from tests.daemon import BIN, free_port
from tests.slapd import DebianSlapd

CHECKOUT = Path(__file__).resolve().parent.parent
GUIDE = CHECKOUT / "docs" / "admin.md"
BLOCK = re.compile(r"```sh\n(.*?)\n```", re.S)
MARKER = re.compile(r"<!-- test: (run|skip)(.*?)-->\s*$")
PASSWORD = "guide-password-1"  # what "the admin" types at every password prompt
TESTED_SECTIONS = ("## 1. ", "## 5. ")


def blocks() -> list[tuple[str, str, str]]:
    """(section title, marker: run / skip / "", block text) of every sh block of the guide."""
    text = GUIDE.read_text()
    found = []
    for match in BLOCK.finditer(text):
        before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = MARKER.search(before)
        section = re.findall(r"^## .*$", text[:match.start()], re.M)[-1]
        found.append((section, marker.group(1) if marker else "", match.group(1)))
    return found


def in_layout(script: str, root: Path, slapd: DebianSlapd) -> str:
    """The guide's paths moved below ``root``, its slapd and ports the test's."""
    for system_path in ("/etc/mailappliance", "/var/lib/mailappliance", "/var/backups/mailappliance"):
        script = script.replace(system_path, f"{root}{system_path}")
    script = script.replace("ldap://127.0.0.1:389", slapd.url)
    script = script.replace("mailappliance-admin directory setup",
                            f"mailappliance-admin directory setup --ldapi {slapd.ldapi_url} --group nogroup")
    script = script.replace("mailappliance-admin backup",
                            f"mailappliance-admin backup --slapd-config {slapd.root / 'slapd.d'}")
    script = script.replace('address = "0.0.0.0"', 'address = "127.0.0.1"')
    return re.sub(r"^port = \d+$", lambda _: f"port = {free_port()}", script, flags=re.M)


def run_in_terminal(script: str, env: dict[str, str], cwd: Path, timeout: float = 120) -> tuple[int, str]:
    """bash -euo pipefail on a terminal of its own; every "...password: " prompt gets PASSWORD."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: nothing but exec
        os.chdir(cwd)
        os.execve("/bin/bash", ["bash", "-euo", "pipefail", "-c", script], env)
    output, pending = b"", b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not select.select([fd], [], [], 0.5)[0]:
                continue
            try:
                data = os.read(fd, 4096)
            except OSError:  # EIO: the shell ended and closed the terminal
                break
            if not data:
                break
            output, pending = output + data, pending + data
            if re.search(rb"[Pp]assword: $", pending):
                os.write(fd, PASSWORD.encode() + b"\n")
                pending = b""
        else:
            os.kill(pid, signal.SIGKILL)
    finally:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), output.decode(errors="replace").replace("\r\n", "\n")


def test_every_block_of_the_tested_sections_says_whether_the_test_runs_it() -> None:
    """A new command block in sections 1 or 5 must be run by this test or say why not."""
    unmarked = [text.splitlines()[0] for section, marker, text in blocks()
                if section.startswith(TESTED_SECTIONS) and not marker]
    assert unmarked == []
    skipped = [text for section, marker, text in blocks() if marker == "skip" and section.startswith(TESTED_SECTIONS)]
    assert all("systemctl" in t or "apt-get" in t or "users.ldif" in t for t in skipped)  # the reasons the guide gives


def test_the_guide_from_a_fresh_debian_to_a_subscriber_reading_mail(
        debian_slapd: Callable[..., DebianSlapd], tmp_path: Path) -> None:
    """Sections 1 and 5 as written: the config, directory setup twice, check-config, the
    first subscriber (passwords typed at prompts), a backup, the subscriber commands;
    the daemon then starts from that config and alice logs in over POP3."""
    slapd = debian_slapd()  # what "apt-get install slapd" after the debconf line makes
    root = tmp_path / "machine"
    etc = root / "etc" / "mailappliance"
    etc.mkdir(parents=True, mode=0o750)  # what the skipped install block makes
    shutil.copy(CHECKOUT / "etc" / "screening.toml", etc)
    (root / "var" / "lib" / "mailappliance").mkdir(parents=True)
    env = {"PATH": f"{BIN}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "HOME": str(tmp_path),
           "MAILAPPLIANCE_CONFIG": str(etc / "mailappliance.toml"), "TERM": "dumb",
           "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    outputs = []
    for section, marker, text in blocks():
        if marker != "run":
            continue
        assert section.startswith(TESTED_SECTIONS), f"{section}: only sections 1 and 5 are walked"
        code, output = run_in_terminal(in_layout(text, root, slapd), env, tmp_path)
        assert code == 0, f"this block of {section} failed ({code}):\n{text}\n--- output:\n{output}"
        outputs.append(output)
    walked = "\n".join(outputs)
    for expected in ("loaded schema misc", "directory ready:", "nothing to do",
                     "ok: alice is uid=alice <alice@example.org>", "alias postmaster@example.org now delivers to alice",
                     "backup in ", "3 subscriber(s)",
                     "deleted bob"):
        assert expected in walked, f"{expected!r} not in:\n{walked}"

    config = etc / "mailappliance.toml"
    with config.open("rb") as f:
        ports = {listener["name"]: listener["port"] for listener in tomllib.load(f)["listeners"]}
    log = root / "twistd.log"
    daemon = subprocess.Popen([str(BIN / "twistd"), "-n", "--pidfile=", "--logfile", str(log),
                               "mailappliance", "--config", str(config)], cwd=tmp_path,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        def pop3s_answers() -> bool:
            assert daemon.poll() is None, log.read_text() if log.exists() else daemon.stdout
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", ports["pop3s"])) == 0
        wait_until(pop3s_answers, 30, what="the daemon of the guide's config answering on pop3s")
        context = ssl.create_default_context(cafile=str(root / "var/lib/mailappliance/tls/server.pem"))
        context.check_hostname = False
        client = poplib.POP3_SSL("127.0.0.1", ports["pop3s"], timeout=10, context=context)
        client.user("alice")
        client.pass_(PASSWORD)
        assert client.stat() == (0, 0)
        client.quit()
    finally:
        daemon.terminate()
        daemon.wait(10)
