"""SIGHUP never needs the LDAP admin password, and secrets read as root at start
survive a reload by the unprivileged daemon (issue 12, point 1)."""

from __future__ import annotations

import os
import poplib
import signal
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest

from mailappliance.config import ConfigError, SecretFiles, load_config
from mailappliance.directory.passwords import make_ssha
from tests.conditions import wait_until
from tests.daemon import free_port, toml_table
from tests.test_privileges import (  # noqa: F401 (world_readable_root is a fixture)
    DEBIAN_PYTHON, NOBODY, NOGROUP, readable_site, root_started_config, wait_for_listener, world_readable_root)

def test_the_admin_password_file_is_not_read_when_the_config_is_loaded(tmp_path: Path) -> None:
    """Parsing the config never reads admin_bind_password_file; the admin tool reads it when it binds."""
    config = tmp_path / "m.toml"
    missing = tmp_path / "no-such-admin-password"
    config.write_text(
        toml_table("[server]", {"local_domains": ["example.org"]})
        + toml_table("[directory]", {"backend": "ldap"})
        + toml_table("[directory.ldap]", {"base_dn": "ou=people,dc=example,dc=org",
                                          "admin_bind_dn": "cn=admin,dc=example,dc=org",
                                          "admin_bind_password_file": str(missing)})
        + toml_table("[[listeners]]", {"role": "mx", "port": 2525})
    )
    settings = load_config(config)
    assert settings.directory.ldap.admin_bind_password_file == missing
    with pytest.raises(ConfigError, match=r"directory\.ldap\.admin_bind_password_file: cannot read"):
        settings.directory.ldap.admin_password()
    missing.write_text("admin-secret\n")
    assert settings.directory.ldap.admin_password() == "admin-secret"


def test_an_unreadable_unchanged_secret_keeps_its_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A secret file the daemon can no longer read keeps the value read at start while unchanged;
    once it changed, the reload is refused rather than the change ignored."""
    secret = tmp_path / "ldap-password"
    secret.write_text("first\n")
    secrets = SecretFiles()
    assert secrets.read(secret) == "first"
    real_read = Path.read_text

    def denied(self: Path, *args: Any, **kwargs: Any) -> str:
        if self == secret:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", denied)
    assert secrets.read(secret) == "first"
    with pytest.raises(PermissionError):
        SecretFiles().read(secret)  # never read before: nothing to keep
    monkeypatch.undo()
    secret.write_text("second, and longer\n")
    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(PermissionError):
        secrets.read(secret)


def test_sighup_as_the_service_user_with_root_only_password_files(world_readable_root: Path, slapd: Any) -> None:
    """Started as root with --uid/--gid, root-only (0600) admin and service password files:
    SIGHUP reloads the configuration and a subscriber still logs in."""
    root = world_readable_root
    site = readable_site(root)
    secrets = root / "etc"
    secrets.mkdir(mode=0o755)
    admin_password, service_password = secrets / "ldap-admin-password", secrets / "ldap-password"
    for path, value in ((admin_password, slapd.admin_password), (service_password, slapd.bind_password)):
        path.write_text(value + "\n")
        path.chmod(0o600)  # root's alone
    pop3s = free_port()
    config = root / "mailappliance.toml"
    config.write_text(
        root_started_config(root)
        + toml_table("[logging]", {"json_file": str(root / "log" / "events.jsonl")})
        + toml_table("[directory]", {"backend": "ldap"})
        + toml_table("[directory.ldap]", {"urls": [slapd.url], "base_dn": slapd.base_dn,
                                          "bind_dn": slapd.bind_dn, "bind_password_file": str(service_password),
                                          "admin_bind_dn": slapd.admin_dn,
                                          "admin_bind_password_file": str(admin_password), "timeout": 2})
        + toml_table("[[listeners]]", {"name": "pop3s", "role": "pop3s", "port": pop3s})
    )
    slapd.add_ldif(f"dn: uid=alice,{slapd.base_dn}\nobjectClass: inetOrgPerson\nobjectClass: inetLocalMailRecipient\n"
                   f"uid: alice\ncn: Alice\nsn: Alice\nmail: alice@example.org\n"
                   f"userPassword: {make_ssha('alice-password')}\n")
    log = root / "twistd.log"
    process = subprocess.Popen(
        [DEBIAN_PYTHON, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
         "-n", "--pidfile=", "--logfile", str(log), f"--uid={NOBODY}", f"--gid={NOGROUP}",
         "mailappliance", "--config", str(config)],
        cwd=root, env={**os.environ, "PYTHONPATH": str(site)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        wait_for_listener(process, pop3s, log)
        process.send_signal(signal.SIGHUP)
        wait_until(lambda: "SIGHUP: configuration reloaded" in log.read_text(), 20, what="the reload")
        text = log.read_text()
        assert "NOT reloaded" not in text, text
        assert "applied: nothing; changed but needing a restart: nothing" in text
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        client = poplib.POP3_SSL("127.0.0.1", pop3s, timeout=10, context=context)
        try:
            client.user("alice@example.org")
            assert client.pass_("alice-password").startswith(b"+OK")
        finally:
            client.quit()
        events = root / "log" / "events.jsonl"  # created by root, handed to the service user
        assert (events.stat().st_uid, (root / "log").stat().st_uid) == (NOBODY, NOBODY)
        assert "configuration reloaded" in events.read_text()
    finally:
        process.terminate()
        process.wait(10)
