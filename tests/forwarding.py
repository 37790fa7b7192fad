"""Setting a subscriber's mailForwardingAddress the way an admin would, on either backend:
an edit of users.ldif (LDIF) or an ldapmodify as the LDAP admin (the entry gets
the mailForwarding class of etc/slapd/forwarding.ldif)."""

from __future__ import annotations

import os
from typing import Any

import ldap3

from mailappliance.directory.ldif_format import format_ldif, parse_ldif, physical_lines


def set_forwards(instance: Any, uid: str, addresses: list[str]) -> None:
    """Give subscriber ``uid`` these forwarding addresses (and nothing else)."""
    if instance.slapd is None:
        path = instance.root / "users.ldif"
        text = path.read_text()
        header = "\n".join(line for line in physical_lines(text) if line.startswith("#"))
        entries = parse_ldif(text)
        [entry] = [e for e in entries if e.first("uid") == uid]
        entry.remove("mailForwardingAddress")
        for address in addresses:
            entry.add("mailForwardingAddress", address)
        staged = path.with_name(".users.ldif.test")
        staged.write_text(format_ldif(entries, header))
        os.chmod(staged, 0o600)
        os.replace(staged, path)
        return
    slapd = instance.slapd
    with slapd.admin_connection() as conn:
        conn.search(slapd.base_dn, f"(uid={uid})", ldap3.SUBTREE, attributes=["objectClass"])
        [found] = [e for e in conn.response if e.get("type") == "searchResEntry"]
        changes: dict[str, Any] = {"mailForwardingAddress": [(ldap3.MODIFY_REPLACE, addresses)]}
        if "mailForwarding" not in found["attributes"]["objectClass"]:
            changes["objectClass"] = [(ldap3.MODIFY_ADD, ["mailForwarding"])]
        assert conn.modify(found["dn"], changes), conn.result
