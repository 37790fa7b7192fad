"""Config validation: one clear line naming file, key and what is valid."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mailappliance.config import ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent
MINIMAL = """
[server]
local_domains = ["example.org"]
[[listeners]]
role = "mx"
port = 2525
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "m.toml"
    path.write_text(text)
    return path


def test_example_config_is_valid() -> None:
    settings = load_config(REPO / "etc" / "mailappliance.toml")
    assert settings.local_domains == ("example.org",)
    assert settings.directory.backend == "ldif"
    assert settings.directory.ldif_file == REPO / "etc" / "users.ldif"
    assert {l.role for l in settings.listeners} == {"mx", "submission", "submissions", "pop3", "pop3s", "autoconfig", "metrics"}


def test_minimal_config_defaults(tmp_path: Path) -> None:
    settings = load_config(write(tmp_path, MINIMAL))
    assert settings.maildir_root == tmp_path / "var" / "mail"
    assert settings.max_message_size == 25 * 1024 * 1024
    assert settings.listeners[0].address == "127.0.0.1"
    assert (settings.commit_threads, settings.sync) == (1, "fsync")


def test_syncfs_is_accepted_where_it_reports_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mailappliance.config as config

    text = MINIMAL + '[storage]\nsync = "syncfs"\n'
    monkeypatch.setattr(config, "syncfs_available", lambda: True)
    assert load_config(write(tmp_path, text)).sync == "syncfs"
    monkeypatch.setattr(config, "syncfs_available", lambda: False)
    with pytest.raises(ConfigError, match=r"storage\.sync: \"syncfs\" needs Linux 5\.8"):
        load_config(write(tmp_path, text))


@pytest.mark.parametrize(
    "text, key, words",
    [
        (MINIMAL.replace("2525", '"abc"'), "listeners[0].port", "whole number from 1 to 65535"),
        (MINIMAL.replace("2525", "70000"), "listeners[0].port", "got 70000"),
        (MINIMAL.replace('"mx"', '"smtp"'), "listeners[0].role", "'mx' or 'submission'"),
        (MINIMAL.replace("example.org", "bad domain"), "server.local_domains", "not a domain"),
        (MINIMAL + "[auth]\ncache_ttl = -1\n", "auth.cache_ttl", "from 0"),
        (MINIMAL + "[directory]\nbackend = 'sql'\n", "directory.backend", "'ldif' or 'ldap'"),
        (MINIMAL + "[directory]\nbackend = 'ldap'\n", "directory.ldap.base_dn", "required"),
        (MINIMAL + "[directory]\nbackend = 'ldap'\n[directory.ldap]\nbase_dn='o=x'\nurls=['http://x']\n",
         "directory.ldap.urls", "ldap://"),
        (MINIMAL + "[smtp]\nmax_mesage_size = 5\n", "smtp.max_mesage_size", "unknown setting"),
        (MINIMAL + "[storage]\nsync = 'fdatasync'\n", "storage.sync", "'fsync' or 'syncfs'"),
        (MINIMAL + "[[listeners]]\nrole='pop3'\nport=2525\n", "listeners[1].port", "already used"),
        (MINIMAL.replace('port = 2525', 'port = 2525\naddress = "localhost"'), "listeners[0].address",
         "IPv4 or IPv6"),
        ("[server\n", "(syntax)", "not valid TOML"),
        ("[server]\nlocal_domains=['example.org']\n", "listeners", "required"),
    ],
)
def test_errors_name_file_key_and_valid_values(tmp_path: Path, text: str, key: str, words: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: {key}: "), message
    assert words in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_daemon_stops_with_one_line_not_a_traceback(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace("2525", "0"))
    twistd = Path(sys.executable).parent / "twistd"
    result = subprocess.run([str(twistd), "-n", "--pidfile=", "mailappliance", "--config", str(path)],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 1
    output = (result.stdout + result.stderr).strip()
    assert output == f"mailappliance: configuration error: {path}: listeners[0].port: " \
                     "must be a whole number from 1 to 65535, got 0"
    assert "Traceback" not in output
