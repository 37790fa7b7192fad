"""`mailappliance-admin directory setup` against a slapd configured as Debian's package
configures a fresh one (issue 12, points 5 and 6), and its pure decisions."""

from __future__ import annotations

import grp
import os
import poplib
import signal
import ssl
import stat
import subprocess
from pathlib import Path
from typing import Any, Callable

import ldap3

from mailappliance.directory_setup import (
    DEBIAN_DEFAULT_ACLS,
    plan_acls,
    plan_indexes,
    plan_limits,
    wanted_acls,
)
from tests.conditions import wait_until
from tests.daemon import BIN, Appliance, free_port, toml_table
from tests.slapd import DebianSlapd
from tests.test_privileges import DEBIAN_PYTHON, NOBODY, NOGROUP, wait_for_listener
from tests.test_privileges import readable_site, root_started_config, world_readable_root  # noqa: F401 (a fixture)

GROUP = "nogroup"  # stands for the daemon's group (mailappliance) on a test machine: NOGROUP
PEOPLE, SERVICE, ADMIN = ("ou=people,dc=example,dc=org", "cn=mailappliance,dc=example,dc=org",
                          "cn=mailappliance-admin,dc=example,dc=org")


def ldap_config(slapd: DebianSlapd, root: Path, suffix: str = "dc=example,dc=org",
                admin_dn: str | None = None) -> dict[str, dict[str, Any]]:
    """The [directory] of a config as docs/admin.md writes it: passwords in files."""
    return {
        "directory": {"backend": "ldap"},
        "directory.ldap": {
            "urls": [slapd.url], "base_dn": f"ou=people,{suffix}", "bind_dn": f"cn=mailappliance,{suffix}",
            "bind_password_file": str(root / "ldap-password"),
            "admin_bind_dn": admin_dn or f"cn=mailappliance-admin,{suffix}",
            "admin_bind_password_file": str(root / "ldap-admin-password"), "timeout": 2,
        },
    }


def setup(instance: Appliance, slapd: DebianSlapd, *options: str) -> Any:
    return instance.admin("directory", "setup", "--ldapi", slapd.ldapi_url, "--group", GROUP, *options)


def config_of(slapd: DebianSlapd, attribute: str) -> list[str]:
    with slapd.root_connection() as conn:
        conn.search("olcDatabase={1}mdb,cn=config", "(objectClass=*)", ldap3.BASE, attributes=[attribute])
        return [v.decode() for v in conn.response[0]["raw_attributes"].get(attribute, [])]


def schemas(slapd: DebianSlapd) -> list[str]:
    with slapd.root_connection() as conn:
        conn.search("cn=schema,cn=config", "(objectClass=*)", ldap3.LEVEL, attributes=["cn"])
        return [e["attributes"]["cn"][0].split("}", 1)[1] for e in conn.response]


def test_setup_readies_a_fresh_debian_slapd_and_the_daemon_logs_a_subscriber_in(
        debian_slapd: Callable[..., DebianSlapd], appliance: Callable[..., Appliance], tmp_path: Path) -> None:
    """On a fresh Debian slapd, setup loads misc, makes the tree, both accounts and their
    password files; a second run has nothing to do; a subscriber added with the admin
    tool then logs in to the daemon over POP3."""
    slapd = debian_slapd()
    instance = appliance(start=False, extra=ldap_config(slapd, tmp_path))
    assert "misc" not in schemas(slapd)

    first = setup(instance, slapd)
    assert first.returncode == 0, first.stderr
    for line in ("loaded schema misc", f"added {PEOPLE}", f"added {SERVICE}", f"added {ADMIN}",
                 "olcDbIndex: mail,mailLocalAddress eq", f'olcLimits: dn.exact="{SERVICE}" size=unlimited',
                 "set the ACLs of olcDatabase={1}mdb,cn=config", "wrote a new password into",
                 "loaded slapd's argon2 module", "olcPasswordHash: {ARGON2}", "loaded schema mailforwarding"):
        assert line in first.stdout, first.stdout
    second = setup(instance, slapd)
    assert second.returncode == 0, second.stderr
    assert second.stdout.startswith("nothing to do"), second.stdout

    service, admin = (os.stat(tmp_path / name) for name in ("ldap-password", "ldap-admin-password"))
    assert (stat.S_IMODE(service.st_mode), service.st_uid, service.st_gid) == (0o640, 0, grp.getgrnam(GROUP).gr_gid)
    assert (stat.S_IMODE(admin.st_mode), admin.st_uid, admin.st_gid) == (0o600, 0, 0)

    added = instance.admin("user", "add", "alice@example.org", password="alice-password")
    assert added.returncode == 0, added.stderr
    instance.start()
    client = instance.pop3("alice", "alice-password")
    assert client.stat() == (0, 0)
    client.quit()


def test_after_setup_the_unprivileged_daemon_reloads_and_logs_a_subscriber_in(
        debian_slapd: Callable[..., DebianSlapd], world_readable_root: Path) -> None:
    """Issue 12's end-to-end check: setup on a fresh Debian slapd writes the password files
    (service 0640 root:<the daemon's group>, admin 0600 root); the daemon started as root
    with --uid/--gid reloads on SIGHUP without the admin password and logs in a subscriber
    that mailappliance-admin added."""
    slapd = debian_slapd()
    root = world_readable_root
    site = readable_site(root)
    pop3s = free_port()
    config = root / "mailappliance.toml"
    config.write_text(
        root_started_config(root)
        + "".join(toml_table(f"[{name}]", values) for name, values in ldap_config(slapd, root / "etc").items())
        + toml_table("[[listeners]]", {"name": "pop3s", "role": "pop3s", "port": pop3s})
    )

    def admin(*args: str, password: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "mailappliance-admin"), "-c", str(config), *args],
                              input=password, capture_output=True, text=True, timeout=60)

    assert admin("directory", "setup", "--ldapi", slapd.ldapi_url, "--group", GROUP).returncode == 0
    assert stat.S_IMODE(os.stat(root / "etc" / "ldap-admin-password").st_mode) == 0o600
    added = admin("user", "add", "alice@example.org", "--password-stdin", password="alice-password\n")
    assert added.returncode == 0, added.stderr
    log = root / "twistd.log"
    process = subprocess.Popen(
        [DEBIAN_PYTHON, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
         "-n", "--pidfile=", "--logfile", str(log), f"--uid={NOBODY}", f"--gid={NOGROUP}",
         "mailappliance", "--config", str(config)],
        cwd=root, env={**os.environ, "PYTHONPATH": str(site)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for_listener(process, pop3s, log)
        wait_until(lambda: catches_sighup(process.pid), 30, what="the daemon's SIGHUP handler")
        process.send_signal(signal.SIGHUP)

        def reload_logged() -> bool:
            assert process.poll() is None, log.read_text()
            return "SIGHUP: configuration" in log.read_text()

        wait_until(reload_logged, 60, what="the reload's log line")
        assert "SIGHUP: configuration reloaded" in log.read_text(), log.read_text()
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        client = poplib.POP3_SSL("127.0.0.1", pop3s, timeout=10, context=context)
        client.user("alice")
        assert client.pass_("alice-password").startswith(b"+OK")
        client.quit()
    finally:
        process.terminate()
        process.wait(10)


def catches_sighup(pid: int) -> bool:
    """The process has a handler for SIGHUP (the Reloader started): /proc's SigCgt mask."""
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16)
    return bool(caught & (1 << (signal.SIGHUP - 1)))


def test_the_acls_keep_passwords_and_other_subscribers_private(
        debian_slapd: Callable[..., DebianSlapd], appliance: Callable[..., Appliance], tmp_path: Path) -> None:
    """After setup nobody reads a password hash; the service account reads what the daemon
    needs and writes nothing; a subscriber reads nobody else; the admin account adds
    subscribers but cannot read hashes either."""
    slapd = debian_slapd()
    instance = appliance(start=False, extra=ldap_config(slapd, tmp_path))
    assert setup(instance, slapd).returncode == 0
    for login in ("alice", "bob"):
        assert instance.admin("user", "add", f"{login}@example.org", password=f"{login}-password").returncode == 0
    assert instance.admin("alias", "add", "alice", "postmaster@example.org").returncode == 0
    server = ldap3.Server(slapd.url, get_info=ldap3.NONE)
    service_password = (tmp_path / "ldap-password").read_text().strip()
    admin_password = (tmp_path / "ldap-admin-password").read_text().strip()

    def visible(who: str | None, password: str | None) -> dict[str, set[str]]:
        conn = ldap3.Connection(server, who, password, auto_bind=True)
        conn.search(PEOPLE, "(objectClass=*)", attributes=["*"])
        return {e["dn"]: set(e["raw_attributes"]) for e in conn.response if e["type"] == "searchResEntry"}

    as_service = visible(SERVICE, service_password)
    assert {"uid", "mail", "mailLocalAddress"} <= as_service[f"uid=alice,{PEOPLE}"]
    assert all("userPassword" not in attributes for attributes in as_service.values())
    as_admin = visible(ADMIN, admin_password)
    assert f"uid=bob,{PEOPLE}" in as_admin and all("userPassword" not in a for a in as_admin.values())
    assert visible(f"uid=alice,{PEOPLE}", "alice-password") == {}
    assert visible(None, None) == {}
    conn = ldap3.Connection(server, f"uid=alice,{PEOPLE}", "alice-password", auto_bind=True)
    conn.search(f"uid=bob,{PEOPLE}", "(objectClass=*)", ldap3.BASE, attributes=["*"])
    assert conn.entries == []
    conn = ldap3.Connection(server, SERVICE, service_password, auto_bind=True)
    assert not conn.modify(f"uid=bob,{PEOPLE}", {"mail": [(ldap3.MODIFY_REPLACE, ["bob2@example.org"])]})
    assert conn.result["description"] == "insufficientAccessRights"
    assert any("uid" in v and "eq" in v for v in config_of(slapd, "olcDbIndex"))
    with slapd.root_connection() as root:
        root.search(f"uid=alice,{PEOPLE}", "(objectClass=*)", ldap3.BASE, attributes=["userPassword"])
        assert root.response[0]["raw_attributes"]["userPassword"][0].startswith(b"{ARGON2}$argon2")  # slapd 2.5: argon2i, t=3, 4 MiB


def test_subscribers_moved_from_the_ldif_directory_keep_their_passwords(
        debian_slapd: Callable[..., DebianSlapd], appliance: Callable[..., Appliance], tmp_path: Path) -> None:
    """The LDIF directory's {ARGON2} hashes load into slapd as they are (docs/admin.md:
    ldapadd -Y EXTERNAL after setup) and log in through slapd's argon2 module."""
    slapd = debian_slapd()
    ldif_made = appliance(start=False)
    assert ldif_made.admin("user", "add", "carol@example.org", password="carol-password").returncode == 0
    instance = appliance(start=False, extra=ldap_config(slapd, tmp_path))
    assert setup(instance, slapd).returncode == 0
    entries = "".join(line for line in (ldif_made.root / "users.ldif").read_text().splitlines(True)
                      if not line.startswith("version:"))
    loaded = subprocess.run(["ldapadd", "-Y", "EXTERNAL", "-H", slapd.ldapi_url, "-c", "-Q"],
                            input=entries, capture_output=True, text=True, timeout=30)
    assert "adding new entry \"uid=carol,ou=people,dc=example,dc=org\"" in loaded.stdout, loaded.stderr
    login = instance.admin("test-login", "carol", password="carol-password")
    assert login.returncode == 0, login.stdout + login.stderr
    admin_bind = subprocess.run(["ldapwhoami", "-x", "-H", slapd.url, "-D", ADMIN,
                                 "-y", str(tmp_path / "ldap-admin-password")], capture_output=True, text=True)
    assert admin_bind.stdout.strip() == f"dn:{ADMIN}", admin_bind.stderr  # -y reads the file as written


def test_another_suffix_is_explained_and_nothing_changes_until_the_admin_chooses(
        debian_slapd: Callable[..., DebianSlapd], appliance: Callable[..., Appliance], tmp_path: Path) -> None:
    """dpkg named the database dc=nodomain: setup changes nothing and says what to do
    (the exact debconf/dpkg-reconfigure lines, --create-database, or the config lines);
    with --create-database the admin tool then works."""
    slapd = debian_slapd(domain="nodomain")
    instance = appliance(start=False, extra=ldap_config(slapd, tmp_path))
    refused = setup(instance, slapd)
    assert refused.returncode == 1
    for text in ("slapd has no database for dc=example,dc=org", "it serves: dc=nodomain",
                 "echo 'slapd slapd/domain string example.org' | debconf-set-selections",
                 "dpkg-reconfigure -f noninteractive slapd", "--create-database",
                 'base_dn = "ou=people,dc=nodomain"'):
        assert text in refused.stderr, refused.stderr
    assert "misc" not in schemas(slapd)
    assert not (tmp_path / "ldap-password").exists()

    created = setup(instance, slapd, "--create-database")
    assert created.returncode == 0, created.stderr
    assert "created database" in created.stdout
    assert setup(instance, slapd, "--create-database").stdout.startswith("nothing to do")
    assert instance.admin("user", "add", "alice@example.org", password="alice-password").returncode == 0
    login = instance.admin("test-login", "alice", password="alice-password")
    assert login.returncode == 0, login.stdout + login.stderr


def test_acls_someone_else_wrote_are_kept_unless_replacing_is_asked_for(
        debian_slapd: Callable[..., DebianSlapd], appliance: Callable[..., Appliance], tmp_path: Path) -> None:
    """ACLs that are neither Debian's defaults nor ours are not overwritten silently."""
    slapd = debian_slapd()
    custom = "{0}to * by users read by * none"
    with slapd.root_connection() as conn:
        conn.modify("olcDatabase={1}mdb,cn=config", {"olcAccess": [(ldap3.MODIFY_REPLACE, [custom])]})
        assert conn.result["result"] == 0
    instance = appliance(start=False, extra=ldap_config(slapd, tmp_path))
    refused = setup(instance, slapd)
    assert refused.returncode == 1
    assert "ACLs this command did not write" in refused.stderr and "--replace-acls" in refused.stderr
    assert config_of(slapd, "olcAccess") == [custom]
    assert setup(instance, slapd, "--replace-acls").returncode == 0
    assert setup(instance, slapd).stdout.startswith("nothing to do")


def test_the_rootdn_as_admin_gets_the_password_of_its_file(
        debian_slapd: Callable[..., DebianSlapd], appliance: Callable[..., Appliance], tmp_path: Path) -> None:
    """admin_bind_dn = Debian's rootDN (whose password dpkg chose): setup sets olcRootPW
    to the password in admin_bind_password_file, once."""
    slapd = debian_slapd()
    instance = appliance(start=False, extra=ldap_config(slapd, tmp_path, admin_dn="cn=admin,dc=example,dc=org"))
    first = setup(instance, slapd)
    assert first.returncode == 0, first.stderr
    assert "set the password of the rootDN cn=admin,dc=example,dc=org (olcRootPW)" in first.stdout
    assert setup(instance, slapd).stdout.startswith("nothing to do")
    assert instance.admin("user", "add", "alice@example.org", password="alice-password").returncode == 0


def test_setup_says_what_is_missing(tmp_path: Path, appliance: Callable[..., Appliance]) -> None:
    """No slapd socket, or a config without [directory.ldap]: one clear message each."""
    instance = appliance(start=False)
    no_ldap = instance.admin("directory", "setup", "--group", GROUP)
    assert no_ldap.returncode == 1 and 'backend = "ldap"' in no_ldap.stderr
    slapd_less = appliance(start=False, extra={
        "directory": {"backend": "ldap"},
        "directory.ldap": {"base_dn": PEOPLE, "bind_dn": SERVICE, "bind_password_file": str(tmp_path / "s"),
                           "admin_bind_dn": ADMIN, "admin_bind_password_file": str(tmp_path / "a")}})
    missing = slapd_less.admin("directory", "setup", "--group", GROUP, "--ldapi", str(tmp_path / "no-socket"))
    assert missing.returncode == 1 and f"no slapd socket at {tmp_path / 'no-socket'}" in missing.stderr


# -- the pure decisions -------------------------------------------------------------


def test_indexes_are_added_where_missing_and_split_where_slapd_would_refuse_a_duplicate() -> None:
    """plan_indexes: Debian's defaults get mail,mailLocalAddress; an attribute indexed
    without eq is rewritten (slapd refuses a second value naming it)."""
    debian = ["{0}objectClass eq", "{1}cn,uid eq", "{2}uidNumber,gidNumber eq", "{3}member,memberUid eq"]
    assert plan_indexes(debian) == ([], ["mail,mailLocalAddress eq"])
    assert plan_indexes(["objectClass eq", "uid,mail,mailLocalAddress eq"]) == ([], [])
    assert plan_indexes(["objectClass eq", "cn,uid pres", "mail,mailLocalAddress eq"]) == (
        ["cn,uid pres"], ["cn pres", "uid eq,pres"])


def test_limits_lift_the_size_limit_of_the_service_account_once() -> None:
    """plan_limits: added when missing, kept when there, replaced when it limits."""
    assert plan_limits([], SERVICE) == ([], [f'dn.exact="{SERVICE}" size=unlimited'])
    assert plan_limits([f'{{0}}dn.exact="{SERVICE}" size=unlimited'], SERVICE) == ([], [])
    assert plan_limits([f'{{0}}dn.exact="{SERVICE.upper()}" size=500'], SERVICE) == (
        [f'{{0}}dn.exact="{SERVICE.upper()}" size=500'], [f'dn.exact="{SERVICE}" size=unlimited'])


def test_acls_are_replaced_only_when_they_are_debians_or_ours() -> None:
    """plan_acls: ours -> ok; none, Debian's or an older version of ours -> replace; else foreign."""
    wanted = wanted_acls(PEOPLE, SERVICE, ADMIN)
    assert plan_acls([f"{{{i}}}{a}" for i, a in enumerate(wanted)], wanted, SERVICE) == "ok"
    assert plan_acls(list(DEBIAN_DEFAULT_ACLS), wanted, SERVICE) == "replace"
    assert plan_acls([], wanted, SERVICE) == "replace"
    older = [f'to dn.subtree="{PEOPLE}" by dn.exact="{SERVICE}" read by * none']
    assert plan_acls(older, wanted, SERVICE) == "replace"
    assert plan_acls(["to * by users read"], wanted, SERVICE) == "foreign"
