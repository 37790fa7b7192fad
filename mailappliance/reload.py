"""SIGHUP: re-read what can change safely, and say in the log what did and what did not.

Applied at once: the TLS certificate files, the screening lists (and the
screening file's location), rate limits and login-throttling settings.
Everything else in the config file is compared with what is running, and
the log names each changed section that needs a restart.
"""

from __future__ import annotations

import signal
from typing import Any

import attrs
from twisted.application import service
from twisted.logger import Logger

from mailappliance.config import ConfigError, Settings, load_config
from mailappliance.screening import ScreeningFileError, ScreeningSource
from mailappliance.tls import ServerTLS

log = Logger(namespace="mailappliance")


class Reloader(service.Service):
    """Installs the SIGHUP handler; ``reload()`` does the work (also callable from tests)."""

    def __init__(self, settings: Settings, server_tls: ServerTLS, screening: ScreeningSource,
                 live: dict[str, Any], reactor: Any) -> None:
        self.settings = settings
        self.server_tls = server_tls
        self.screening = screening
        self.live = live  # objects whose .settings may be swapped: {"limits": RateLimits, "throttle": AuthThrottle}
        self.reactor = reactor
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        self._previous = signal.signal(signal.SIGHUP, self._on_signal)

    def stopService(self) -> None:
        super().stopService()
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.reload)

    def reload(self) -> None:
        self._reload_settings()
        try:
            log.info("SIGHUP: TLS certificate reloaded, SHA-256 fingerprint {fp}", fp=self.server_tls.reload())
        except Exception as e:  # keep serving with the old certificate
            log.error("SIGHUP: TLS certificate NOT reloaded, keeping the old one: {why}", why=e)
        try:
            if self.screening.reload():
                log.info("SIGHUP: screening lists reloaded from {file}", file=self.screening.file)
        except ScreeningFileError as e:
            log.error("SIGHUP: screening lists NOT reloaded, keeping the old ones: {why}", why=str(e))

    def _reload_settings(self) -> None:
        try:
            new = load_config(self.settings.source)
        except ConfigError as e:
            log.error("SIGHUP: configuration NOT reloaded, keeping the running one: {why}", why=str(e))
            return
        applied, restart = [], []
        for field in attrs.fields(Settings):
            old_value, new_value = getattr(self.settings, field.name), getattr(new, field.name)
            if old_value == new_value:
                continue
            if field.name in self.live:
                self.live[field.name].settings = new_value
                applied.append(field.name)
            elif field.name == "screening" and attrs.evolve(old_value, file=new_value.file) == new_value:
                self.screening.file = new_value.file
                applied.append("screening.file")
            else:
                restart.append(field.name)
                continue
            self.settings = attrs.evolve(self.settings, **{field.name: new_value})
        log.warn("SIGHUP: configuration re-read; applied: {applied}; changed but needing a restart: {restart}",
                 applied=", ".join(applied) or "nothing", restart=", ".join(restart) or "nothing")
