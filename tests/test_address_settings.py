"""The address keys of the config ([server] alias_domains, recipient_delimiter, catch_all,
postmaster, abuse; [forwarding]): one clear line naming file, key and what is valid."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from mailappliance.addressing import build_addressing
from mailappliance.config import ConfigError, load_config

CONFIG = """
[server]
local_domains = ["example.net", "example.com"]
{server}
[storage]
spool_dir = "{root}/spool"
[forwarding]
{forwarding}
[[listeners]]
role = "mx"
port = 2525
"""


def config(tmp_path: Path, server: str = "", forwarding: str = "") -> Path:
    path = tmp_path / "m.toml"
    path.write_text(CONFIG.format(server=server, forwarding=forwarding, root=tmp_path))
    return path


def test_defaults(tmp_path: Path) -> None:
    """Sub-addressing with "+", no alias domains, no catch-all, SRS in the first domain, key next to the spool."""
    settings = load_config(config(tmp_path))
    a, f = settings.addresses, settings.forwarding
    assert (a.alias_domains, a.recipient_delimiter, a.catch_all, a.postmaster) == ((), "+", (), "")
    assert (f.srs_domain, f.srs_secret_file, f.srs_max_age_days) == ("example.net", tmp_path / "srs.key", 21)
    assert settings.screening.refuse_at == "rcpt"


def test_full_settings(tmp_path: Path) -> None:
    """Every key read as written, domains and addresses lower-cased."""
    settings = load_config(config(
        tmp_path,
        server='alias_domains = {"Example.ORG" = "example.net"}\nrecipient_delimiter = "+-"\n'
               'catch_all = {"example.com" = "Info@Example.org"}\npostmaster = "hostmaster@example.org"\n'
               'abuse = "abuse-desk@example.net"',
        forwarding='srs_domain = "example.org"\nsrs_old_secret_files = ["old.key"]\nsrs_max_age_days = 7'))
    a, f = settings.addresses, settings.forwarding
    assert a.alias_domains == (("example.org", "example.net"),)
    assert (a.recipient_delimiter, a.catch_all) == ("+-", (("example.com", "info@example.org"),))
    assert (a.postmaster, a.abuse) == ("hostmaster@example.org", "abuse-desk@example.net")
    assert (f.srs_domain, f.srs_old_secret_files, f.srs_max_age_days) == ("example.org", (tmp_path / "old.key",), 7)


@pytest.mark.parametrize("server, forwarding, key, words", [
    ('alias_domains = {"example.org" = "elsewhere.example"}', "", "server.alias_domains.example.org",
     "must be one of server.local_domains"),
    ('alias_domains = {"example.com" = "example.net"}', "", "server.alias_domains.example.com",
     "NOT local itself"),
    ('alias_domains = {"bad domain" = "example.net"}', "", "server.alias_domains.bad domain", "not a domain"),
    ('alias_domains = "example.org"', "", "server.alias_domains", "a table"),
    ('recipient_delimiter = "="', "", "server.recipient_delimiter", "'+-_'"),
    ('recipient_delimiter = "@"', "", "server.recipient_delimiter", "'+-_'"),
    ('catch_all = {"remote.example" = "info@example.net"}', "", "server.catch_all.remote.example",
     "local_domains"),
    ('alias_domains = {"example.org" = "example.net"}\ncatch_all = {"example.org" = "info@example.net"}', "",
     "server.catch_all.example.org", "alias domain uses its local domain's catch-all"),
    ('catch_all = {"example.net" = "info@remote.example"}', "", "server.catch_all.example.net",
     "not in one of our domains"),
    ('catch_all = {"example.net" = "not an address"}', "", "server.catch_all.example.net", ""),
    ('postmaster = "hostmaster@remote.example"', "", "server.postmaster", "not in one of our domains"),
    ("", 'srs_domain = "remote.example"', "forwarding.srs_domain", "must be one of our domains"),
    ("", "srs_max_age_days = 0", "forwarding.srs_max_age_days", "from 1 to 365"),
    ("", "srs_secret = 'x'", "forwarding.srs_secret", "unknown setting"),
])
def test_errors_name_file_and_key(tmp_path: Path, server: str, forwarding: str, key: str, words: str) -> None:
    """Alias domains must point at a local domain and not be one; catch-alls only on local domains, to our
    addresses; role mailboxes and the SRS domain in our domains; delimiters among "+-_"."""
    path = config(tmp_path, server, forwarding)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"{path}: {key}: "), str(caught.value)
    assert words in str(caught.value)


def test_srs_key_made_at_start_and_refused_when_broken(tmp_path: Path) -> None:
    """build_addressing makes a 0600 key on first start, keeps it after, and stops naming the key when it is bad."""
    settings = load_config(config(tmp_path, server='alias_domains = {"example.org" = "example.net"}'))
    addressing = build_addressing(settings)
    key = tmp_path / "srs.key"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert addressing.srs is not None and addressing.srs.domain == "example.net"
    assert addressing.accepted_domains == {"example.net", "example.com", "example.org"}
    assert build_addressing(settings).srs.keys == addressing.srs.keys  # type: ignore[union-attr]
    key.write_text("short")
    with pytest.raises(ConfigError, match=r"forwarding\.srs_secret_file: .*too short"):
        build_addressing(settings)
