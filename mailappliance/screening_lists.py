"""The screening list file: parsing and validation (a settings file the admin edits).

The decisions that use the lists are pure functions in :mod:`mailappliance.screening`;
the config validates the file with :func:`load_lists` so that a broken file is a
config error naming the key, before anything starts.
"""

from __future__ import annotations

import ipaddress
import tomllib
from pathlib import Path
from typing import Any

import attrs

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ScreeningFileError(Exception):
    """The screening file is wrong; the message names the file and the key."""


@attrs.frozen
class ScreeningLists:
    allow_networks: tuple[Network, ...] = ()
    block_networks: tuple[Network, ...] = ()
    allow_client_domains: tuple[str, ...] = ()
    block_client_domains: tuple[str, ...] = ()
    block_helo: tuple[str, ...] = ()
    allow_senders: tuple[str, ...] = ()
    block_senders: tuple[str, ...] = ()
    dnsbl_zones: tuple[str, ...] = ()

    @property
    def needs_client_name(self) -> bool:
        return bool(self.allow_client_domains or self.block_client_domains)


def _strings(file: Path, table: dict[str, Any], section: str, key: str) -> tuple[str, ...]:
    value = table.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ScreeningFileError(f"{file}: {section}.{key}: must be a list of non-empty strings")
    return tuple(v.strip().lower() for v in value)


def _networks(file: Path, table: dict[str, Any], section: str) -> tuple[Network, ...]:
    networks = []
    for text in _strings(file, table, section, "networks"):
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise ScreeningFileError(
                f"{file}: {section}.networks: {text!r} is not an IPv4/IPv6 network like 203.0.113.0/24"
            ) from None
    return tuple(networks)


def parse_lists(file: Path, data: dict[str, Any]) -> ScreeningLists:
    known = {"allow": {"networks", "client_domains", "senders"},
             "block": {"networks", "client_domains", "helo", "senders"}, "dnsbl": {"zones"}}
    for section, table in data.items():
        if section not in known or not isinstance(table, dict):
            raise ScreeningFileError(f"{file}: {section}: unknown section (known: allow, block, dnsbl)")
        for key in table:
            if key not in known[section]:
                raise ScreeningFileError(
                    f"{file}: {section}.{key}: unknown key (known: {', '.join(sorted(known[section]))})")
    allow, block, dnsbl = data.get("allow", {}), data.get("block", {}), data.get("dnsbl", {})
    return ScreeningLists(
        allow_networks=_networks(file, allow, "allow"),
        block_networks=_networks(file, block, "block"),
        allow_client_domains=_strings(file, allow, "allow", "client_domains"),
        block_client_domains=_strings(file, block, "block", "client_domains"),
        block_helo=_strings(file, block, "block", "helo"),
        allow_senders=_strings(file, allow, "allow", "senders"),
        block_senders=_strings(file, block, "block", "senders"),
        dnsbl_zones=tuple(z.rstrip(".") for z in _strings(file, dnsbl, "dnsbl", "zones")),
    )


def load_lists(file: Path) -> ScreeningLists:
    try:
        with open(file, "rb") as f:
            return parse_lists(file, tomllib.load(f))
    except OSError as e:
        raise ScreeningFileError(f"{file}: cannot be read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ScreeningFileError(f"{file}: not valid TOML: {e}") from None
