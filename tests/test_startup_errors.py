"""Default state paths, check-config's path checks, and one-line start-up errors
(issue 12, point 2)."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path
from typing import Callable

from mailappliance.admin_ops import path_problem
from mailappliance.config import load_config
from tests.daemon import BIN, Appliance, toml_table

REPO = Path(__file__).resolve().parent.parent


def run_daemon(config: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "twistd"), "-n", "--pidfile=", "--logfile", str(cwd / "twistd.log"),
                           "mailappliance", "--config", str(config)],
                          cwd=cwd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def test_state_defaults_to_var_lib_wherever_the_config_is(tmp_path: Path) -> None:
    """The example copied to /etc/mailappliance keeps its state in /var/lib/mailappliance, never /etc/var."""
    copied = tmp_path / "etc" / "mailappliance" / "mailappliance.toml"
    copied.parent.mkdir(parents=True)
    copied.write_text((REPO / "etc" / "mailappliance.toml").read_text())
    (copied.parent / "screening.toml").write_text((REPO / "etc" / "screening.toml").read_text())
    settings = load_config(copied)
    state = Path("/var/lib/mailappliance")
    assert (settings.maildir_root, settings.spool_dir) == (state / "mail", state / "spool")
    assert (settings.tls.certificate, settings.tls.private_key) == (state / "tls" / "server.pem",
                                                                    state / "tls" / "server.key")


def test_path_checks_name_what_the_daemon_could_not_write(tmp_path: Path) -> None:
    """check-config's path rule: under /etc fails, a read-only or unwritable file system fails,
    a file in the way fails, outside the unit's writable paths warns, /var/lib/mailappliance is fine."""
    assert path_problem(Path("/etc/var/tls"))[0] == "fail"  # type: ignore[index]
    assert "read-only file system" in path_problem(tmp_path / "x", read_only=lambda p: True)[1]  # type: ignore[index]
    assert "not writable (to create it)" in path_problem(tmp_path / "x" / "y", access=lambda p: False,
                                                          read_only=lambda p: False)[1]  # type: ignore[index]
    (tmp_path / "file").write_text("")
    assert "is not a directory" in path_problem(tmp_path / "file" / "mail")[1]  # type: ignore[index]
    assert path_problem(tmp_path / "mail")[0] == "warn"  # type: ignore[index]
    assert path_problem(Path("/var/lib/mailappliance/mail"), access=lambda p: True,
                        read_only=lambda p: False) is None


def test_check_config_fails_on_state_under_etc(appliance: Callable[..., Appliance]) -> None:
    """A certificate to be generated under /etc (the old ../var/tls trap) fails check-config, naming the key."""
    instance = appliance(start=False, extra={"tls": {"certificate": "/etc/var/tls/server.pem",
                                                     "private_key": "/etc/var/tls/server.key"}})
    checked = instance.admin("check-config")
    assert checked.returncode == 1, checked.stdout
    assert "FAIL paths      tls.certificate: /etc/var/tls is under /etc" in checked.stdout
    assert not Path("/etc/var").exists()


def test_an_unusable_storage_path_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    """A Maildir root that cannot be created stops the start with one line naming the key and the path."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    config = tmp_path / "m.toml"
    config.write_text(
        toml_table("[server]", {"local_domains": ["example.org"]})
        + toml_table("[storage]", {"maildir_root": str(blocker / "mail"), "spool_dir": str(tmp_path / "spool")})
        + toml_table("[tls]", {"certificate": str(tmp_path / "tls" / "s.pem"),
                               "private_key": str(tmp_path / "tls" / "s.key")})
        + toml_table("[directory]", {"ldif_file": str(tmp_path / "users.ldif")})
        + toml_table("[[listeners]]", {"role": "mx", "port": 2525})
    )
    (tmp_path / "users.ldif").write_text("")
    ran = run_daemon(config, tmp_path)
    assert ran.returncode == 1
    assert ran.stderr.strip().splitlines() == [
        f"mailappliance: cannot start: {config}: storage.maildir_root: cannot use {blocker / 'mail'}: Not a directory"]
    assert "Traceback" not in ran.stderr + (tmp_path / "twistd.log").read_text()


def test_a_port_in_use_is_one_line(tmp_path: Path) -> None:
    """A listener whose port is taken stops the start with one line naming the address and port."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "m.toml"
        config.write_text(
            toml_table("[server]", {"local_domains": ["example.org"]})
            + toml_table("[storage]", {"maildir_root": str(tmp_path / "mail"), "spool_dir": str(tmp_path / "spool")})
            + toml_table("[tls]", {"certificate": str(tmp_path / "tls" / "s.pem"),
                                   "private_key": str(tmp_path / "tls" / "s.key")})
            + toml_table("[directory]", {"ldif_file": str(tmp_path / "users.ldif")})
            + toml_table("[[listeners]]", {"role": "mx", "port": port})
        )
        (tmp_path / "users.ldif").write_text("")
        ran = run_daemon(config, tmp_path)
    assert ran.returncode == 1
    assert ran.stderr.strip().splitlines() == [
        f"mailappliance: cannot start: cannot listen on 127.0.0.1:{port}: Address already in use"]
