"""`mailappliance-admin backup` / `restore` (issue 12, point 10): a running daemon's mail,
queue, config and keys, and a local slapd, into a private directory and back onto an
empty machine layout."""

from __future__ import annotations

import json
import smtplib
import stat
import subprocess
from pathlib import Path
from typing import Callable

from tests.daemon import BIN, Appliance, free_port
from tests.slapd import Slapd


def send(instance: Appliance, sender: str, recipient: str, subject: str, submission: bool = False) -> None:
    body = f"From: {sender}\r\nTo: {recipient}\r\nSubject: {subject}\r\n\r\n{subject} body\r\n"
    if submission:
        with smtplib.SMTP("127.0.0.1", instance.ports["submission"], timeout=10) as client:
            client.starttls(context=instance.client_context())
            client.login("alice", "alice-password")
            client.sendmail(sender, [recipient], body)
    else:
        with smtplib.SMTP("127.0.0.1", instance.ports["mx"], timeout=10) as client:
            client.sendmail(sender, [recipient], body)


def mailbox(instance: Appliance) -> list[bytes]:
    """Every message alice gets over POP3, in order (without deleting any)."""
    client = instance.pop3("alice", "alice-password")
    try:
        count, _ = client.stat()
        return [b"\r\n".join(client.retr(i + 1)[1]) for i in range(count)]
    finally:
        client.quit()


def test_backup_of_a_running_daemon_restores_onto_an_empty_machine(
        appliance: Callable[..., Appliance], tmp_path: Path) -> None:
    """Mail in new/ and cur/, a queued message, config, LDIF directory and TLS key go into a
    private backup while the daemon runs; restored into an empty layout, a daemon there
    serves the same mail over POP3, queues the same message and knows the same password."""
    dead_end = free_port()  # nothing listens: the queued message stays queued
    instance = appliance(start=False, extra={"queue": {"retry_schedule": [3600]},
                                             "queue.transports": {'"remote.example"': f"[127.0.0.1]:{dead_end}"}})
    assert instance.admin("user", "add", "alice@example.org", password="alice-password").returncode == 0
    keygen = instance.admin("dkim", "keygen", "example.org")
    assert keygen.returncode == 0, keygen.stderr
    instance.start()
    send(instance, "friend@example.net", "alice@example.org", "first")
    assert len(mailbox(instance)) == 1  # the login moved it from new/ to cur/
    send(instance, "friend@example.net", "alice@example.org", "second")
    send(instance, "alice@example.org", "someone@remote.example", "outbound", submission=True)
    queued = json.loads(instance.admin("--json", "queue", "list").stdout)["messages"]
    assert [m["recipients"][0]["address"] for m in queued] == ["someone@remote.example"]
    before = mailbox(instance)

    backup = tmp_path / "backup"
    made = instance.admin("backup", str(backup))
    assert made.returncode == 0, made.stderr
    assert "2 messages in Maildirs, 1 queued" in made.stdout, made.stdout
    assert stat.S_IMODE(backup.stat().st_mode) == 0o700
    for path in backup.rglob("*"):
        assert stat.S_IMODE(path.stat().st_mode) == (0o700 if path.is_dir() else 0o600), path
    manifest = json.loads((backup / "manifest.json").read_text())
    stored = {Path(f["path"]).name: f for f in manifest["files"]}
    assert {"mailappliance.toml", "users.ldif", "server.key", "server.pem", "srs.key"} <= set(stored)
    dkim_keys = [Path(f["path"]) for f in manifest["files"] if "/example.org/" in f["path"]]
    assert dkim_keys and all(path.suffix == ".key" for path in dkim_keys)  # the [dkim] key_dir
    assert all(len(f["sha256"]) == 64 for f in manifest["files"])
    instance.stop()

    moved = instance.root.with_name("old-machine")
    instance.root.rename(moved)  # the new machine: nothing at the old paths
    restored = subprocess.run([str(BIN / "mailappliance-admin"), "restore", str(backup)],
                              capture_output=True, text=True, timeout=120)
    assert restored.returncode == 0, restored.stderr
    again = subprocess.run([str(BIN / "mailappliance-admin"), "restore", str(backup)],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and "refusing to overwrite" in again.stderr
    assert (instance.root / "server.key").exists() is False  # keys went back where they were
    assert (instance.root / "tls" / "server.key").read_bytes() == (moved / "tls" / "server.key").read_bytes()
    for key in dkim_keys:
        assert key.read_bytes() == (moved / key.relative_to(instance.root)).read_bytes()

    instance.start()
    assert mailbox(instance) == before
    after = json.loads(instance.admin("--json", "queue", "list").stdout)["messages"]
    assert [m["queue_id"] for m in after] == [m["queue_id"] for m in queued]


def test_a_local_slapd_without_the_directory_is_left_out(
        tmp_path: Path, appliance: Callable[..., Appliance], slapd: Slapd) -> None:
    """A slapd on this host that does not hold base_dn (the directory is elsewhere) is
    not dumped: a restore must not put an unrelated directory onto the new machine."""
    other = tmp_path / "other-slapd"
    other.mkdir()
    unrelated = Slapd(other)  # holds dc=example,dc=org: the config below says dc=elsewhere
    instance = appliance(backend="ldap", slapd=slapd, start=False,
                         extra={"directory.ldap": {"base_dn": "ou=people,dc=elsewhere,dc=example"}})
    made = instance.admin("backup", str(tmp_path / "backup"), "--slapd-config", str(unrelated.root / "slapd.d"))
    assert made.returncode == 0, made.stderr
    assert "does not hold ou=people,dc=elsewhere,dc=example" in made.stdout
    assert not (tmp_path / "backup" / "slapd").exists()


def test_a_damaged_backup_restores_nothing(appliance: Callable[..., Appliance], tmp_path: Path) -> None:
    """One changed byte: restore names the file and writes nothing."""
    instance = appliance(start=False)
    assert instance.admin("user", "add", "alice@example.org", password="alice-password").returncode == 0
    backup = tmp_path / "backup"
    assert instance.admin("backup", str(backup)).returncode == 0
    stored = backup / ("files" + str(instance.root / "users.ldif"))
    stored.write_bytes(stored.read_bytes().replace(b"alice", b"alicf", 1))
    instance.root.rename(instance.root.with_name("old"))
    damaged = instance.admin("restore", str(backup))
    assert damaged.returncode == 1 and f"backup damaged: {stored}" in damaged.stderr
    assert not instance.root.exists()


def test_a_local_slapd_is_backed_up_with_slapcat_and_restored_with_slapadd(
        tmp_path: Path, appliance: Callable[..., Appliance]) -> None:
    """LDAP backend on the slapd host, as root: slapd's config (-n0) and database (-n1)
    go into the backup; restored onto a machine without them, slapd starts with the
    same subscribers and the daemon's logins work."""
    root = tmp_path / "ldap"
    root.mkdir()
    slapd = Slapd(root)
    slapd.start()
    try:
        instance = appliance(backend="ldap", slapd=slapd, start=False)
        assert instance.admin("user", "add", "alice@example.org", password="alice-password").returncode == 0
        backup = tmp_path / "backup"
        made = instance.admin("backup", str(backup), "--slapd-config", str(root / "slapd.d"))
        assert made.returncode == 0, made.stderr
        assert "slapd config and 1 database(s)" in made.stdout
        assert {p.name for p in (backup / "slapd").iterdir()} == {"config.ldif", "db1.ldif"}
        assert b"uid=alice" in (backup / "slapd" / "db1.ldif").read_bytes()
        running = instance.admin("restore", str(backup), "--force")
        assert running.returncode == 1 and "stop it first" in running.stderr, running.stdout + running.stderr
    finally:
        slapd.stop()
    root.rename(tmp_path / "old-ldap")
    instance.root.rename(tmp_path / "old-appliance")
    restored = instance.admin("restore", str(backup))
    assert restored.returncode == 0, restored.stderr
    assert "start slapd now" in restored.stdout
    again = Slapd(root, build=False, port=slapd.port)
    again.start()
    try:
        with again.admin_connection() as conn:
            conn.search(again.base_dn, "(uid=alice)", attributes=["mail"])
            assert [e.mail.value for e in conn.entries] == ["alice@example.org"]
        login = instance.admin("test-login", "alice", password="alice-password")
        assert login.returncode == 0, login.stdout + login.stderr
    finally:
        again.stop()
