"""Started as root on privileged ports, the daemon runs as an unprivileged user (twistd --uid/--gid)
and keeps its files private to that user."""

from __future__ import annotations

import os
import shutil
import smtplib
import socket
import stat
import subprocess
import sysconfig
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest

import mailappliance

from tests.conditions import wait_until
from tests.daemon import BIN, first_bindable, toml_table

DEBIAN_PYTHON = "/usr/bin/python3.11"  # readable by everyone, unlike a Python under /root
NOBODY, NOGROUP = 65534, 65534

REPO = Path(__file__).resolve().parent.parent


def free_low_port(exclude: set[int]) -> int:
    port = first_bindable(range(700, 1024), exclude)
    if port is None:
        raise RuntimeError("no free port below 1024")
    return port


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def root_started_config(root: Path, **server: Any) -> str:
    """The [server], [storage] and [tls] tables of a daemon started as root with its state under ``root``/data."""
    return (toml_table("[server]", {"hostname": "mx.test.example", "local_domains": ["example.org"], **server})
            + toml_table("[storage]", {"maildir_root": str(root / "data" / "mail"),
                                       "spool_dir": str(root / "data" / "spool")})
            + toml_table("[tls]", {"certificate": str(root / "data" / "tls" / "server.pem"),
                                   "private_key": str(root / "data" / "tls" / "server.key")}))


def readable_site(root: Path) -> Path:
    """The installed packages where an unprivileged user can read them, with the
    mailappliance package the tests import (the working tree) over the installed one."""
    site = root / "site-packages"
    shutil.copytree(sysconfig.get_paths()["purelib"], site, copy_function=_link_or_copy, symlinks=True)
    shutil.rmtree(site / "mailappliance", ignore_errors=True)
    shutil.copytree(Path(mailappliance.__file__).parent, site / "mailappliance",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(REPO / "twisted" / "plugins" / "mailappliance_plugin.py",
                 site / "twisted" / "plugins" / "mailappliance_plugin.py")
    return site


def wait_for_listener(process: subprocess.Popen[bytes], port: int, log: Path, timeout: float = 30) -> None:
    """Until the daemon accepts connections and has started its services (which
    happens after twistd dropped privileges; the port is bound before that);
    its output and log explain a failure to start."""
    def ready() -> bool:
        if process.poll() is not None:
            output = process.stdout.read() if process.stdout else b""
            raise RuntimeError(f"daemon exited: {output.decode()}\n{log.read_text() if log.exists() else ''}")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0 and log.exists() and "mailappliance ready" in log.read_text()

    try:
        wait_until(ready, timeout, what=f"the daemon ready on port {port}")
    except AssertionError:
        raise RuntimeError(f"daemon did not open port {port}:\n{log.read_text() if log.exists() else ''}") from None


@pytest.fixture
def world_readable_root() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.fail("this test starts the daemon as root, as an admin does: run it as root (CI does)")
    root = Path(tempfile.mkdtemp(prefix="mailappliance-priv-", dir="/tmp"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_root_on_low_ports_then_runs_as_nobody(world_readable_root: Path) -> None:
    """Started as root on ports below 1024 it runs as nobody, delivers, and keeps mail, spool and key private."""
    root = world_readable_root
    site = readable_site(root)  # the installed packages, where the unprivileged user can read them
    mx = free_low_port(set())
    pop3 = free_low_port({mx})
    config = root / "mailappliance.toml"
    config.write_text(
        root_started_config(root)
        + toml_table("[directory]", {"backend": "ldif", "ldif_file": str(root / "users.ldif")})
        + toml_table("[[listeners]]", {"name": "mx", "role": "mx", "port": mx})
        + toml_table("[[listeners]]", {"name": "pop3", "role": "pop3", "port": pop3})
    )
    added = subprocess.run([str(BIN / "mailappliance-admin"), "--config", str(config), "user", "add",
                            "alice@example.org", "--password-stdin"], input="alice-password\n",
                           capture_output=True, text=True)
    assert added.returncode == 0, added.stderr
    (root / "users.ldif").chmod(0o644)  # the admin makes the directory file readable for the daemon's user
    log = root / "twistd.log"
    process = subprocess.Popen(
        [DEBIAN_PYTHON, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
         "-n", "--pidfile=", "--logfile", str(log), f"--uid={NOBODY}", f"--gid={NOGROUP}",
         "mailappliance", "--config", str(config)],
        cwd=root, env={**os.environ, "PYTHONPATH": str(site)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        wait_for_listener(process, mx, log)
        status = Path(f"/proc/{process.pid}/status").read_text()
        uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
        gids = next(line for line in status.splitlines() if line.startswith("Gid:")).split()[1:]
        assert uids == [str(NOBODY)] * 4 and gids == [str(NOGROUP)] * 4

        with smtplib.SMTP("127.0.0.1", mx, timeout=10) as smtp:
            smtp.ehlo("client.example.net")
            assert smtp.sendmail("friend@example.net", ["alice@example.org"], b"Subject: x\r\n\r\ny\r\n") == {}
        [delivered] = (root / "data" / "mail" / "alice" / "new").iterdir()
        info = delivered.stat()
        assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (NOBODY, 0o600)
        for directory in (root / "data" / "mail", root / "data" / "mail" / "alice", root / "data" / "spool"):
            info = directory.stat()
            assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (NOBODY, 0o700), directory
        key = (root / "data" / "tls" / "server.key").stat()
        assert (key.st_uid, stat.S_IMODE(key.st_mode)) == (NOBODY, 0o600)
    finally:
        process.terminate()
        process.wait(10)
