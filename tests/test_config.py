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
    assert settings.maildir_root == Path("/var/lib/mailappliance/mail")  # never beside the config (/etc/var)
    assert settings.spool_dir == Path("/var/lib/mailappliance/spool")
    assert settings.tls.certificate == Path("/var/lib/mailappliance/tls/server.pem")
    assert settings.max_message_size == 25 * 1024 * 1024
    assert settings.listeners[0].address == "127.0.0.1"
    assert (settings.commit_threads, settings.sync) == (1, "journal")


def test_the_journal_is_the_default_with_one_worker_and_with_several(tmp_path: Path) -> None:
    """sync defaults to "journal", also with [server] workers = 2 (one journal per process)."""
    assert load_config(write(tmp_path, MINIMAL)).sync == "journal"
    text = MINIMAL.replace("[server]\n", "[server]\nworkers = 2\n") + '[state]\nredis = "redis://127.0.0.1:6379"\n'
    assert load_config(write(tmp_path, text)).sync == "journal"


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


MAIL_AND_WEB = """
[server]
local_domains = ["example.org"]
[limits]
max_connections = 100
[[listeners]]
role = "mx"
port = 2525
[[listeners]]
role = "submissions"
port = 4465
[[listeners]]
role = "pop3s"
port = 9995
[[listeners]]
role = "metrics"
port = 9100
"""


def test_listener_connection_shares(tmp_path: Path) -> None:
    """SMTP and POP3 listeners share limits.max_connections evenly unless they set their own."""
    settings = load_config(write(tmp_path, MAIL_AND_WEB))
    assert [l.max_connections for l in settings.listeners] == [33, 33, 33, 0]  # HTTP: its own default
    text = MAIL_AND_WEB.replace("port = 2525", "port = 2525\nmax_connections = 60") \
                       .replace("port = 9100", "port = 9100\nmax_connections = 5")
    settings = load_config(write(tmp_path, text))
    assert [l.max_connections for l in settings.listeners] == [60, 20, 20, 5]
    assert (settings.limits.concurrent_per_network, settings.limits.session_lifetime) == (50, 3600)
    settings = load_config(write(tmp_path, MINIMAL + "[limits]\nsession_lifetime = 0\nconcurrent_per_network = 8\n"))
    assert (settings.limits.session_lifetime, settings.limits.concurrent_per_network) == (0, 8)
    assert settings.listeners[0].max_connections == 1000


@pytest.mark.parametrize(
    "text, key, words",
    [
        (MAIL_AND_WEB.replace("port = 9995", "port = 9995\nmax_connections = 101"), "listeners[2].max_connections",
         "add up to 101, more than limits.max_connections = 100"),
        (MAIL_AND_WEB.replace("port = 2525", "port = 2525\nmax_connections = 99"), "limits.max_connections",
         "100 leaves no connection for listeners[1]"),
        (MAIL_AND_WEB.replace("port = 2525", "port = 2525\nmax_connections = 0"), "listeners[0].max_connections",
         "whole number from 1 to"),
        (MINIMAL + "[limits]\nsession_lifetime = -1\n", "limits.session_lifetime", "number from 0 to"),
        (MINIMAL + "[limits]\nconcurrent_per_network = 0\n", "limits.concurrent_per_network", "from 1 to"),
    ],
)
def test_connection_limit_errors(tmp_path: Path, text: str, key: str, words: str) -> None:
    """Connection caps that cannot hold name the key and what would be valid."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"{path}: {key}: ") and words in str(caught.value), str(caught.value)
