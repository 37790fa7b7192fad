"""The address settings of the config: alias domains, sub-addressing, catch-alls,
the postmaster/abuse mailboxes (``[server]``) and SRS forwarding (``[forwarding]``).

Parsed here (with the config's reader, so every error names file and key) to
keep :mod:`mailappliance.config` short; the decisions that use them are in
:mod:`mailappliance.addressing`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs

from mailappliance.addresses import normalize_address, normalize_domain
from mailappliance.directory import InvalidAddress

DELIMITER_CHARACTERS = "+-_"


@attrs.frozen
class AddressSettings:
    """``[server]``: alias domains, the sub-address delimiter, catch-alls, role mailboxes."""

    alias_domains: tuple[tuple[str, str], ...] = ()  # (alias domain, local domain)
    recipient_delimiter: str = "+"  # "" turns sub-addressing off
    catch_all: tuple[tuple[str, str], ...] = ()  # (local domain, address); none by default
    postmaster: str = ""  # "" -> postmaster@<first local domain>
    abuse: str = ""  # "" -> the postmaster mailbox


@attrs.frozen
class ForwardingSettings:
    """``[forwarding]``: the SRS domain and keys of forwarded mail."""

    srs_domain: str = ""
    srs_secret_file: Path = Path("srs.key")
    srs_old_secret_files: tuple[Path, ...] = ()
    srs_max_age_days: int = 21


def _domain(reader: Any, key: str, text: Any) -> str:
    if not isinstance(text, str):
        raise reader.error(key, f"must be a domain name in quotes, got {text!r}")
    try:
        return normalize_domain(text).rstrip(".")
    except InvalidAddress as e:
        raise reader.error(key, str(e)) from None


def _address(reader: Any, key: str, text: Any) -> str:
    if not isinstance(text, str):
        raise reader.error(key, f"must be an address in quotes, got {text!r}")
    try:
        return normalize_address(text)
    except InvalidAddress as e:
        raise reader.error(key, str(e)) from None


def parse_addresses(server: Any, local_domains: tuple[str, ...]) -> AddressSettings:
    """Read the address keys of ``[server]`` (``server`` is the config's reader of that table)."""
    local = set(local_domains)
    aliases = []
    alias_table = server.table_of("alias_domains")
    for alias, target in alias_table.table.items():
        alias_domain = _domain(alias_table, alias, alias)
        target_domain = _domain(alias_table, alias, target)
        if alias_domain in local:
            raise alias_table.error(alias, f"{alias_domain} is one of server.local_domains; an alias domain "
                                           "is a domain that is NOT local itself")
        if target_domain not in local:
            raise alias_table.error(alias, f"{target_domain} must be one of server.local_domains "
                                           f"({', '.join(local_domains)})")
        aliases.append((alias_domain, target_domain))
    accepted = local | {a for a, _ in aliases}

    delimiter = server.string("recipient_delimiter", "+")
    if len(delimiter) > len(DELIMITER_CHARACTERS) or any(c not in DELIMITER_CHARACTERS for c in delimiter):
        raise server.error("recipient_delimiter",
                           f"must be \"\" (off) or characters among {DELIMITER_CHARACTERS!r}, got {delimiter!r}")

    catch_all = []
    catch_table = server.table_of("catch_all")
    for domain, address in catch_table.table.items():
        catch_domain = _domain(catch_table, domain, domain)
        if catch_domain not in local:
            raise catch_table.error(domain, f"must be one of server.local_domains ({', '.join(local_domains)}); "
                                            "an alias domain uses its local domain's catch-all")
        target = _address(catch_table, domain, address)
        if target.rpartition("@")[2] not in accepted:
            raise catch_table.error(domain, f"{target} is not in one of our domains")
        catch_all.append((catch_domain, target))

    roles = {}
    for role in ("postmaster", "abuse"):
        value = server.string(role, "")
        if value:
            value = _address(server, role, value)
            if value.rpartition("@")[2] not in accepted:
                raise server.error(role, f"{value} is not in one of our domains (server.local_domains)")
        roles[role] = value
    server.used.update({"alias_domains", "catch_all"})
    return AddressSettings(tuple(aliases), delimiter, tuple(catch_all), roles["postmaster"], roles["abuse"])


def parse_forwarding(reader: Any, local_domains: tuple[str, ...], addresses: AddressSettings,
                     spool_dir: Path) -> ForwardingSettings:
    """Read ``[forwarding]``; the key file defaults to ``srs.key`` next to the spool directory."""
    accepted = set(local_domains) | {a for a, _ in addresses.alias_domains}
    domain = reader.string("srs_domain", "") or (local_domains[0] if local_domains else "")
    if domain:
        domain = _domain(reader, "srs_domain", domain)
        if domain not in accepted:
            raise reader.error("srs_domain", f"{domain} must be one of our domains (bounces to it must come "
                                             "back here); publish an SPF record for it that names this server")
    key = reader.path("srs_secret_file") if "srs_secret_file" in reader.table else spool_dir.parent / "srs.key"
    old = tuple(_paths(reader, "srs_old_secret_files"))
    settings = ForwardingSettings(
        srs_domain=domain,
        srs_secret_file=key,
        srs_old_secret_files=old,
        srs_max_age_days=reader.integer("srs_max_age_days", 21, 1, 365),
    )
    reader.reject_unknown()
    return settings


def _paths(reader: Any, name: str) -> list[Path]:
    paths = []
    for text in reader.strings(name, ()):
        path = Path(text).expanduser()
        paths.append(path if path.is_absolute() else (reader.file.parent / path).resolve())
    return paths


