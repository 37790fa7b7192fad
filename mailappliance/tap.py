"""Command-line options and service construction for ``twistd mailappliance``."""

from __future__ import annotations

import sys

from twisted.application.service import IService
from twisted.python import usage

from mailappliance.config import ConfigError, load_config


class Options(usage.Options):
    """Options of ``twistd mailappliance``; everything else lives in the TOML file."""

    synopsis = "--config PATH"
    longdesc = (
        "Runs the MX, submission and POP3 listeners described in the TOML config "
        "file. See etc/mailappliance.toml for an annotated example and "
        "docs/admin.md for the admin guide."
    )
    optParameters = [
        ["config", "c", "etc/mailappliance.toml", "Path of the TOML configuration file."],
    ]


def makeService(options: Options) -> IService:
    """Build the whole appliance; a bad config ends the process with one clear line."""
    from mailappliance.service import build_service

    parent = getattr(options, "parent", None) or {}
    uid, gid = parent.get("uid"), parent.get("gid")
    owner = (uid, gid if gid is not None else -1) if uid is not None else None
    try:
        settings = load_config(options["config"])
        return build_service(settings, owner=owner)
    except ConfigError as e:
        print(f"mailappliance: configuration error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
