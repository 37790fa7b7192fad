"""The subscriber directory: one record type, one store interface, two backends.

A *store* (``LdifStore``, ``LdapStore``) is synchronous and is what the admin
CLI uses directly.  The daemon never calls a store on the reactor thread: it
wraps the store in :class:`mailappliance.directory.threaded.Directory`, which
runs every call in a dedicated thread pool and returns Deferreds.
"""

from __future__ import annotations

import re
from typing import Protocol

import attrs

DISABLED_ATTRIBUTE = "employeeType"
DISABLED_VALUE = "disabled"
LIMIT_ATTRIBUTE = "description"  # values like "limit:messages_per_hour=500"
FORWARD_ATTRIBUTE = "mailForwardingAddress"  # qmail-ldap's attribute (etc/slapd/forwarding.ldif)
_LIMIT_VALUE = re.compile(r"^limit:([a-z_]+)=([0-9]{1,9})$")


def parse_limits(values: list[str]) -> tuple[tuple[str, int], ...]:
    """Per-subscriber rate-limit overrides from ``description: limit:NAME=N`` values."""
    found = []
    for value in values:
        match = _LIMIT_VALUE.match(value.strip())
        if match:
            found.append((match[1], int(match[2])))
    return tuple(found)


class DirectoryUnavailable(Exception):
    """The directory could not answer (server down, timeout, unreadable file).

    Always a *temporary* condition: protocols answer 4xx / -ERR [SYS/TEMP].
    """


class DirectoryAdminError(Exception):
    """An admin operation was refused; the message is meant for the admin."""


class DuplicateEntry(DirectoryAdminError):
    """The subscriber or address already exists."""


class NoSuchSubscriber(DirectoryAdminError):
    """No subscriber has that login or address."""


class InvalidAddress(DirectoryAdminError, ValueError):
    """An address or login is not acceptable."""


@attrs.frozen
class Subscriber:
    """One subscriber as the directory describes them.

    ``uid`` is the stable login and names the Maildir; ``mail`` is the primary
    address; ``aliases`` are the ``mailLocalAddress`` values, which deliver to
    the same mailbox and which the subscriber may use as sender.  ``forwards``
    are the ``mailForwardingAddress`` values: mail is forwarded there, and kept
    here too only if one of them is the subscriber's own address
    (:mod:`mailappliance.addressing`).
    """

    dn: str
    uid: str
    mail: str
    aliases: tuple[str, ...] = ()
    display_name: str = ""
    disabled: bool = False
    certificates: tuple[bytes, ...] = attrs.field(default=(), repr=False)
    limits: tuple[tuple[str, int], ...] = ()
    forwards: tuple[str, ...] = ()

    @property
    def addresses(self) -> tuple[str, ...]:
        """Every address that belongs to this subscriber, primary first."""
        return (self.mail, *(a for a in self.aliases if a != self.mail))

    def owns_address(self, address: str) -> bool:
        """True if ``address`` (compared case-insensitively) is one of ours."""
        wanted = address.lower()
        return any(a.lower() == wanted for a in self.addresses)


class DirectoryStore(Protocol):
    """What every backend offers.  All methods are blocking.

    Lookups raise :class:`DirectoryUnavailable` when the backend cannot answer;
    admin methods raise :class:`DirectoryAdminError` subclasses for refusals.
    Addresses and logins are matched case-insensitively.
    """

    def find_by_login(self, login: str) -> Subscriber | None:
        """The subscriber whose ``uid`` or ``mail`` equals ``login``."""

    def find_by_address(self, address: str) -> Subscriber | None:
        """The subscriber whose ``mail`` or a ``mailLocalAddress`` is ``address``."""

    def verify_password(self, subscriber: Subscriber, password: str) -> bool:
        """True if ``password`` is the subscriber's password.  A refusal costs
        at least what :meth:`verify_unknown` costs (no fast path for an entry
        without a usable hash)."""

    def verify_unknown(self, password: str) -> bool:
        """Always False, at the cost of a refused :meth:`verify_password`: for a
        login that finds no subscriber, so timing does not enumerate logins."""

    def find_by_certificate(self, der: bytes) -> Subscriber | None:
        """The subscriber whose ``userCertificate;binary`` is exactly ``der``."""

    def list_subscribers(self) -> list[Subscriber]:
        """Every subscriber, sorted by uid."""

    def add_subscriber(
        self, uid: str, mail: str, password: str | None, display_name: str = ""
    ) -> Subscriber:
        """Create a subscriber; DuplicateEntry if the uid or address is taken."""

    def set_password(self, login: str, password: str) -> None:
        """Replace the password (LDAP: Password Modify exop, the server hashes)."""

    def set_disabled(self, login: str, disabled: bool) -> None:
        """Disable (or re-enable) a subscriber without deleting it."""

    def delete_subscriber(self, login: str) -> None:
        """Remove the subscriber entry (the Maildir is left for the admin)."""

    def add_alias(self, login: str, alias: str) -> None:
        """Add a ``mailLocalAddress``; DuplicateEntry if anyone has it already."""

    def delete_alias(self, alias: str) -> None:
        """Remove a ``mailLocalAddress`` from whoever has it."""

    def add_certificate(self, login: str, der: bytes) -> None:
        """Store a client certificate; DuplicateEntry if any subscriber has it already."""

    def remove_certificate(self, login: str, der: bytes) -> None:
        """Revoke: remove the certificate; NoSuchSubscriber if the subscriber lacks it."""

    def close(self) -> None:
        """Release connections."""
