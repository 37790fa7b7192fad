"""How `mailappliance-admin` is called (issue 12, points 7-9): which config file it uses,
global options anywhere, and a clear word instead of a traceback without a terminal."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Callable

import pytest

from mailappliance.admin import CONFIG_ENVIRONMENT, DEFAULT_CONFIG, config_location
from tests.daemon import BIN, Appliance


def admin(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
          stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """The installed command, as an admin types it (no --config added)."""
    environment = {k: v for k, v in os.environ.items() if k != CONFIG_ENVIRONMENT}
    environment.update(env or {})
    return subprocess.run([str(BIN / "mailappliance-admin"), *args], capture_output=True, text=True,
                          env=environment, cwd=cwd, timeout=60,
                          input=stdin, stdin=subprocess.DEVNULL if stdin is None else None)


@pytest.fixture
def instance(appliance: Callable[..., Appliance]) -> Appliance:
    made = appliance(start=False)
    assert made.admin("user", "add", "alice@example.org", password="alice-password").returncode == 0
    return made


def test_the_config_file_is_c_then_the_environment_then_etc(monkeypatch: pytest.MonkeyPatch) -> None:
    """-c wins, then $MAILAPPLIANCE_CONFIG, then /etc/mailappliance/mailappliance.toml; never ./etc."""
    monkeypatch.delenv(CONFIG_ENVIRONMENT, raising=False)
    assert config_location(None) == (DEFAULT_CONFIG, "the default")
    assert DEFAULT_CONFIG == Path("/etc/mailappliance/mailappliance.toml")
    monkeypatch.setenv(CONFIG_ENVIRONMENT, "/srv/mail.toml")
    assert config_location(None) == (Path("/srv/mail.toml"), f"from {CONFIG_ENVIRONMENT}")
    assert config_location("x.toml") == (Path("x.toml"), "given with -c")


def test_the_environment_names_the_config_and_errors_say_which_file(
        instance: Appliance, tmp_path: Path) -> None:
    """MAILAPPLIANCE_CONFIG works from any directory; a missing file is named with how it was chosen."""
    listed = admin("user", "list", env={CONFIG_ENVIRONMENT: str(instance.config_path)}, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "alice" in listed.stdout
    missing = admin("user", "list", env={CONFIG_ENVIRONMENT: str(tmp_path / "nope.toml")}, cwd=tmp_path)
    assert missing.returncode == 2
    assert f"{tmp_path / 'nope.toml'}: (file): does not exist" in missing.stderr
    assert f"from {CONFIG_ENVIRONMENT}" in missing.stderr and "-c FILE" in missing.stderr
    given = admin("-c", str(tmp_path / "other.toml"), "user", "list", cwd=tmp_path)
    assert given.returncode == 2 and "given with -c" in given.stderr


def test_global_options_may_follow_the_subcommand(instance: Appliance) -> None:
    """`user list --json` and `user list -c FILE --json` work like `--json user list`."""
    before = admin("-c", str(instance.config_path), "--json", "user", "list")
    after = admin("user", "list", "--json", "-c", str(instance.config_path))
    assert before.returncode == after.returncode == 0, after.stderr
    assert json.loads(after.stdout) == json.loads(before.stdout)
    assert json.loads(after.stdout)[0]["uid"] == "alice"
    shown = admin("user", "show", "alice", "--config", str(instance.config_path), "--json")
    assert json.loads(shown.stdout)["mail"] == "alice@example.org"


def test_without_a_terminal_password_prompts_say_use_password_stdin(instance: Appliance) -> None:
    """user add, user passwd and test-login with stdin not a tty: exit 2 and one line, no EOFError."""
    config = ("-c", str(instance.config_path))
    for command in (("user", "add", "bob@example.org"), ("user", "passwd", "alice"), ("test-login", "alice")):
        result = admin(*config, *command)
        assert result.returncode == 2, (command, result.stderr)
        assert result.stderr.strip() == "mailappliance-admin: no terminal: use --password-stdin"
        assert "Traceback" not in result.stderr
    piped = admin(*config, "test-login", "alice", "--password-stdin", stdin="alice-password\n")
    assert piped.returncode == 0, piped.stdout + piped.stderr
