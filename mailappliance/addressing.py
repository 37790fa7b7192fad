"""Where a local recipient address goes: pure decisions over the address facts.

The SMTP session has already decided (``policy.decide_recipient``) that the
address is in one of our domains (a local domain or an alias domain).  Here:

- an **alias domain** (``[server] alias_domains``) is replaced by its
  canonical local domain: ``user@example.org`` is ``user@example.net``;
- an **SRS** local part (``SRS0=``/``SRS1=``) is a bounce to a message we
  forwarded: reversed (hash and age checked, :mod:`mailappliance.srs`) or refused;
- otherwise the directory is asked, in order, for: the address itself; the
  address without its **sub-address** (``alice+lists`` -> ``alice``, RFC 5233);
  for ``postmaster``/``abuse`` (RFC 5321 4.5.1, RFC 2142) the configured
  mailbox; the domain's **catch-all** address.  The first entry found decides;
- a found subscriber may **forward** (``mailForwardingAddress``): remote
  targets get a copy through the outbound queue, local ones a copy in their
  mailbox, and the subscriber keeps one only if a forwarding address is one of
  their own addresses.

Nothing here does I/O; the session does the lookups the plan asks for.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import attrs
from twisted.logger import Logger

from mailappliance.addresses import is_safe_mailbox_name
from mailappliance.config import ConfigError
from mailappliance.directory import Subscriber
from mailappliance.mailpath import MailPath, PathSyntaxError, parse_path
from mailappliance.srs import Srs, SrsError, ensure_key, load_keys, looks_like_srs, read_key

log = Logger(namespace="mailappliance")

ROLE_ACCOUNTS = ("postmaster", "abuse")
MAX_FORWARDS = 16  # forwarding addresses used per entry; more are ignored (and logged)
MAX_TAG = 64  # characters of a sub-address used to name a folder


@attrs.frozen
class Addressing:
    """The facts every address decision needs (from the config; the keys of SRS)."""

    local_domains: frozenset[str]
    alias_domains: Mapping[str, str] = attrs.field(factory=dict, converter=dict, hash=False)  # alias -> local
    delimiter: str = ""  # sub-address delimiter characters; "" is off
    catch_all: Mapping[str, str] = attrs.field(factory=dict, converter=dict, hash=False)  # domain -> address
    postmaster: str = ""  # where postmaster@ goes when no entry names it ("": postmaster@first domain)
    abuse: str = ""  # where abuse@ goes when no entry names it ("": the postmaster mailbox)
    srs: Srs | None = None
    first_domain: str = ""  # the first of local_domains in the config (bare <postmaster>, defaults)

    @property
    def accepted_domains(self) -> frozenset[str]:
        """Every domain we take mail for: local and alias domains."""
        return self.local_domains | frozenset(self.alias_domains)

    @property
    def default_domain(self) -> str:
        return self.first_domain or min(self.local_domains, default="")

    def is_ours(self, domain: str) -> bool:
        return domain.lower() in self.local_domains or domain.lower() in self.alias_domains

    def canonical_domain(self, domain: str) -> str:
        domain = domain.lower()
        return self.alias_domains.get(domain, domain)

    def canonical_address(self, address: str) -> str:
        """``address`` with an alias domain replaced by its local domain (domain lower-cased)."""
        local, at, domain = address.rpartition("@")
        if not at:
            return address
        return f"{local}@{self.canonical_domain(domain)}"

    def split_tag(self, local_part: str) -> tuple[str, str]:
        """``("alice", "lists")`` for ``alice+lists``; ``(local_part, "")`` without a sub-address."""
        if not self.delimiter:
            return local_part, ""
        for i, char in enumerate(local_part):
            if char in self.delimiter:
                if i == 0:
                    return local_part, ""
                return local_part[:i], local_part[i + 1:]
        return local_part, ""

    def is_role_account(self, recipient: MailPath) -> bool:
        """postmaster@ or abuse@ (with or without a sub-address) of one of our domains, or bare <postmaster>."""
        if recipient.quoted or recipient.source_route:
            return False
        if recipient.domain and not self.is_ours(recipient.domain):
            return False
        base, _ = self.split_tag(recipient.local_part)
        if not recipient.domain:
            return recipient.local_part.lower() == "postmaster"
        return base.lower() in ROLE_ACCOUNTS

    def role_mailbox(self, role: str) -> str:
        """The configured mailbox of ``postmaster`` or ``abuse`` (canonical)."""
        postmaster = self.postmaster or f"postmaster@{self.default_domain}"
        address = (self.abuse or postmaster) if role == "abuse" else postmaster
        return self.canonical_address(address).lower()


# -- the plan for one recipient ----------------------------------------------------

@attrs.frozen
class Lookup:
    """One directory question: ``address``, found by way of ``kind``."""

    address: str
    kind: str  # "address", "subaddress", "postmaster", "catch-all"
    tag: str = ""  # the sub-address, for "subaddress"


@attrs.frozen
class SrsReturn:
    """A valid bounce to one of our SRS addresses: it goes back to ``address``."""

    address: str


@attrs.frozen
class SrsRefusal:
    """An SRS-looking address that we did not make (or that expired): refused, never relayed."""

    reason: str


Plan = tuple[Lookup, ...] | SrsReturn | SrsRefusal


def plan_recipient(addressing: Addressing, recipient: MailPath, now: float) -> Plan:
    """What to do with a recipient in one of our domains (``decide_recipient`` said LOCAL)."""
    local = recipient.local_part
    domain = addressing.canonical_domain(recipient.domain or addressing.default_domain)
    if looks_like_srs(local):
        if addressing.srs is None:
            return SrsRefusal("no SRS key on this server")
        try:
            return SrsReturn(addressing.srs.reverse(local, now))
        except SrsError as e:
            return SrsRefusal(str(e))
    lookups = [Lookup(f"{local}@{domain}".lower(), "address")]
    base, tag = addressing.split_tag(local)
    if tag:
        lookups.append(Lookup(f"{base}@{domain}".lower(), "subaddress", tag))
    role = base.lower()
    if role in ROLE_ACCOUNTS:
        lookups.append(Lookup(addressing.role_mailbox(role), "postmaster"))
    elif domain in addressing.catch_all:
        lookups.append(Lookup(addressing.canonical_address(addressing.catch_all[domain]).lower(), "catch-all"))
    unique: dict[str, Lookup] = {}
    for lookup in lookups:
        unique.setdefault(lookup.address, lookup)
    return tuple(unique.values())


# -- a found subscriber ---------------------------------------------------------------

@attrs.frozen
class Resolution:
    """Where mail for one accepted recipient goes."""

    received_as: str  # the address as the client gave it (for Delivered-To and the logs)
    subscriber: Subscriber
    kind: str  # the Lookup kind that found the subscriber
    folder: str = ""  # a Maildir++ folder (".lists") to file into, if it exists
    deliver_locally: bool = True
    forward_remote: tuple[str, ...] = ()  # copies through the outbound queue (SRS sender)
    forward_local: tuple[str, ...] = ()  # copies into other local mailboxes
    ignored_forwards: tuple[str, ...] = ()  # forwarding values we cannot use (for the log)


def folder_for_tag(tag: str) -> str:
    """The Maildir++ folder name for a sub-address (``lists`` -> ``.lists``); "" when
    the tag cannot safely name one (a '/', a leading '.', '..', control characters, too long)."""
    if not tag or len(tag) > MAX_TAG or tag.startswith(".") or not is_safe_mailbox_name(tag):
        return ""
    return "." + tag


def forward_target(value: str) -> MailPath | None:
    """A ``mailForwardingAddress`` value as a path we may send to, or None."""
    value = value.strip()
    if value.startswith("<") and value.endswith(">"):
        value = value[1:-1]
    try:
        path = parse_path(f"<{value}>", allow_null=False)
    except PathSyntaxError:
        return None
    if (not path.domain or path.quoted or path.source_route or path.is_address_literal
            or set("%!@:") & set(path.local_part)):
        return None
    return path


def resolve(addressing: Addressing, lookup: Lookup, subscriber: Subscriber, received_as: str) -> Resolution:
    """The delivery plan for a recipient once ``lookup`` found ``subscriber``."""
    folder = folder_for_tag(lookup.tag) if lookup.kind == "subaddress" else ""
    own = {addressing.canonical_address(a).lower() for a in subscriber.addresses}
    keep, remote, local, ignored = False, [], [], []
    for n, value in enumerate(subscriber.forwards):
        target = forward_target(value) if n < MAX_FORWARDS else None
        if target is None:
            ignored.append(value)
            continue
        canonical = addressing.canonical_address(target.address).lower()
        if canonical in own:
            keep = True
        elif addressing.is_ours(target.domain):
            if looks_like_srs(target.local_part):
                ignored.append(value)
            else:
                local.append(canonical)
        else:
            remote.append(target.address)
    remote, local = _unique(remote), _unique(local)
    forwards = bool(remote or local)
    return Resolution(
        received_as=received_as, subscriber=subscriber, kind=lookup.kind, folder=folder,
        deliver_locally=keep or not forwards,  # nothing usable to forward to: keep it here
        forward_remote=tuple(remote), forward_local=tuple(local), ignored_forwards=tuple(ignored),
    )


def _unique(addresses: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(a for a in addresses))


# -- senders --------------------------------------------------------------------------

def sender_forms(addressing: Addressing, address: str) -> tuple[str, ...]:
    """The addresses a sender address may stand for: itself, its alias-domain
    canonical form, and both without a sub-address."""
    local, at, domain = address.rpartition("@")
    if not at:
        return (address,)
    base, tag = addressing.split_tag(local)
    forms = [address, addressing.canonical_address(address)]
    if tag:
        forms += [f"{base}@{domain}", addressing.canonical_address(f"{base}@{domain}")]
    return tuple(dict.fromkeys(forms))


def forwarding_sender(addressing: Addressing, sender: str, now: float) -> str:
    """The envelope sender of a forwarded copy: SRS-rewritten into our domain, so SPF
    at the destination checks our servers.  The null sender stays null; a sender
    in our own domains is already ours and stays as it is."""
    if not sender or addressing.srs is None:
        return sender
    if addressing.is_ours(sender.rpartition("@")[2]):
        return sender
    return addressing.srs.forward(sender, now) or sender


# -- from the settings: the daemon's and the admin tool's Addressing -------------------


def build_addressing(settings: Any, owner: tuple[int, int] | None = None) -> Any:
    """The :class:`~mailappliance.addressing.Addressing` facts for the daemon, with its
    SRS keys: the key file is created (0600, handed to ``owner`` when we run as
    root) on first start; a broken one stops the start naming the key."""
    forwarding = settings.forwarding
    srs = None
    if forwarding.srs_domain:
        key = "forwarding.srs_secret_file"
        try:
            if ensure_key(forwarding.srs_secret_file, owner):
                log.info("created a new SRS key in {path}", path=forwarding.srs_secret_file)
            keys = load_keys(forwarding.srs_secret_file, forwarding.srs_old_secret_files)
        except ValueError as e:
            raise ConfigError(settings.source, key, str(e)) from None
        except OSError as e:
            path = e.filename or forwarding.srs_secret_file
            raise ConfigError(settings.source, key, f"cannot create or read {path}: {e.strerror}") from None
        srs = Srs(keys, forwarding.srs_domain, forwarding.srs_max_age_days)
    return addressing_of(settings, srs)


def addressing_of(settings: Any, srs: Any = None) -> Any:
    """The address facts of ``settings`` (with ``srs``, or none: the admin tool, unit tests)."""
    a = settings.addresses
    return Addressing(
        local_domains=frozenset(settings.local_domains), alias_domains=dict(a.alias_domains),
        delimiter=a.recipient_delimiter, catch_all=dict(a.catch_all), postmaster=a.postmaster,
        abuse=a.abuse, srs=srs, first_domain=settings.local_domains[0] if settings.local_domains else "",
    )


def address_checks(settings: Any, store: Any) -> list[dict[str, Any]]:
    """check-config's findings on the address settings: catch-alls (a warning: they take
    spam for made-up addresses), role mailboxes and catch-all targets that no entry has,
    and the SRS key files."""
    addressing = addressing_of(settings)
    results: list[dict[str, Any]] = []

    def warn(check: str, detail: str) -> None:
        results.append({"check": check, "ok": True, "warn": True, "detail": detail})

    def missing(address: str) -> bool:
        try:
            return store.find_by_address(address) is None
        except Exception:  # the directory check reports a directory that does not answer
            return False

    for domain, address in settings.addresses.catch_all:
        warn("catch-all", f"{domain}: mail for every unknown address is accepted for {address}: spam to made-up "
                          "addresses is accepted too, and senders never learn of their typos")
        if missing(addressing.canonical_address(address)):
            warn("catch-all", f"{domain}: the catch-all {address} is no subscriber's address: unknown addresses "
                              "will get 550 until it is")
    for role in ("postmaster", "abuse"):
        mailbox = addressing.role_mailbox(role)
        if missing(mailbox):
            warn(role, f"{role}@ of every domain goes to {mailbox} ([server] {role}), which is no subscriber's "
                       f"address: RCPT to {role}@ gets 451 until it is")
    forwarding = settings.forwarding
    if forwarding.srs_domain:
        for key, path in [("forwarding.srs_secret_file", forwarding.srs_secret_file),
                          *(("forwarding.srs_old_secret_files", p) for p in forwarding.srs_old_secret_files)]:
            if key == "forwarding.srs_secret_file" and not path.exists():
                results.append({"check": "srs", "ok": True, "detail": f"{path} will be created at the first start"})
                continue
            try:
                read_key(path)
            except (OSError, ValueError) as e:
                results.append({"check": "srs", "ok": False, "detail": f"{key}: {e}"})
            else:
                results.append({"check": "srs", "ok": True,
                                "detail": f"{path} holds an SRS key (forwarded mail leaves as SRS0=...@"
                                          f"{forwarding.srs_domain}: its SPF record must name this server)"})
    return results
