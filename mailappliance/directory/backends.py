"""Choosing the configured directory backend (used by the daemon and the admin CLI)."""

from __future__ import annotations

from mailappliance.config import DirectorySettings
from mailappliance.directory import DirectoryStore


def build_store(settings: DirectorySettings) -> DirectoryStore:
    """The store for ``settings.backend``: ``ldif`` (embedded) or ``ldap``."""
    if settings.backend == "ldap":
        from mailappliance.directory.ldap import LdapStore

        return LdapStore(settings.ldap)
    from mailappliance.directory.ldif import LdifStore

    return LdifStore(settings.ldif_file)
