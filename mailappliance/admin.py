"""``mailappliance-admin``: manage subscribers and aliases in either backend.

Works on the directory named in the config file.  For LDAP it binds as
``directory.ldap.admin_bind_dn`` and sets passwords with the Password Modify
extended operation, so slapd hashes them with its own policy.

Exit codes: 0 done, 1 refused (duplicate, unknown user, bad address),
2 usage or configuration error, 75 directory temporarily unavailable.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from typing import Any, Callable

from mailappliance.addresses import normalize_address
from mailappliance.config import ConfigError, Settings, load_config
from mailappliance.directory.backends import build_store
from mailappliance.directory import (
    DirectoryAdminError,
    DirectoryStore,
    DirectoryUnavailable,
    InvalidAddress,
    NoSuchSubscriber,
    Subscriber,
)

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_TEMPFAIL = 0, 1, 2, 75


class CommandContext:
    """What a subcommand gets: settings, the store, and how to print."""

    def __init__(self, settings: Settings, store: DirectoryStore, as_json: bool) -> None:
        self.settings = settings
        self.store = store
        self.as_json = as_json

    def local_address(self, text: str) -> str:
        """A valid address in one of our local domains."""
        address = normalize_address(text)
        domain = address.rsplit("@", 1)[1]
        if domain not in self.settings.local_domains:
            raise InvalidAddress(
                f"{address}: domain {domain!r} is not in server.local_domains "
                f"({', '.join(self.settings.local_domains)}) of {self.settings.source}"
            )
        return address

    def done(self, message: str, **fields: Any) -> None:
        if self.as_json:
            print(json.dumps({"ok": True, **fields}))
        else:
            print(message)


def _subscriber_fields(s: Subscriber) -> dict[str, Any]:
    return {
        "uid": s.uid, "mail": s.mail, "aliases": list(s.aliases), "name": s.display_name,
        "disabled": s.disabled, "certificates": len(s.certificates), "dn": s.dn,
    }


def _read_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("New password: ")
        if getpass.getpass("Repeat password: ") != password:
            raise InvalidAddress("the two passwords differ")
    if len(password) < 8:
        raise InvalidAddress("a password needs at least 8 characters")
    return password


def cmd_user_add(ctx: CommandContext, args: argparse.Namespace) -> None:
    mail = ctx.local_address(args.address)
    uid = args.uid or mail.split("@", 1)[0]
    password = None if args.no_password else _read_password(args)
    subscriber = ctx.store.add_subscriber(uid, mail, password, args.name or "")
    ctx.done(f"added {subscriber.uid} <{subscriber.mail}>", subscriber=_subscriber_fields(subscriber))


def cmd_user_passwd(ctx: CommandContext, args: argparse.Namespace) -> None:
    ctx.store.set_password(args.login, _read_password(args))
    ctx.done(f"password changed for {args.login}")


def cmd_user_disable(ctx: CommandContext, args: argparse.Namespace) -> None:
    ctx.store.set_disabled(args.login, True)
    ctx.done(f"disabled {args.login}: logins refused, mail refused with 550 5.2.1")


def cmd_user_enable(ctx: CommandContext, args: argparse.Namespace) -> None:
    ctx.store.set_disabled(args.login, False)
    ctx.done(f"enabled {args.login}")


def cmd_user_delete(ctx: CommandContext, args: argparse.Namespace) -> None:
    ctx.store.delete_subscriber(args.login)
    ctx.done(f"deleted {args.login} (the Maildir under {ctx.settings.maildir_root} is kept)")


def cmd_user_list(ctx: CommandContext, args: argparse.Namespace) -> None:
    subscribers = ctx.store.list_subscribers()
    if ctx.as_json:
        print(json.dumps([_subscriber_fields(s) for s in subscribers]))
        return
    for s in subscribers:
        flags = " [disabled]" if s.disabled else ""
        aliases = f"  aliases: {', '.join(s.aliases)}" if s.aliases else ""
        print(f"{s.uid:<20} {s.mail}{flags}{aliases}")
    print(f"{len(subscribers)} subscriber(s)")


def cmd_user_show(ctx: CommandContext, args: argparse.Namespace) -> None:
    subscriber = ctx.store.find_by_login(args.login) or ctx.store.find_by_address(args.login)
    if subscriber is None:
        raise NoSuchSubscriber(f"no subscriber with login or address {args.login!r}")
    fields = _subscriber_fields(subscriber)
    if ctx.as_json:
        print(json.dumps(fields))
    else:
        for key, value in fields.items():
            print(f"{key + ':':<14} {', '.join(value) if isinstance(value, list) else value}")


def cmd_alias_add(ctx: CommandContext, args: argparse.Namespace) -> None:
    alias = ctx.local_address(args.alias)
    ctx.store.add_alias(args.login, alias)
    ctx.done(f"alias {alias} now delivers to {args.login}")


def cmd_alias_delete(ctx: CommandContext, args: argparse.Namespace) -> None:
    alias = normalize_address(args.alias)
    ctx.store.delete_alias(alias)
    ctx.done(f"alias {alias} removed")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailappliance-admin", description="Manage mailappliance subscribers and aliases."
    )
    parser.add_argument("-c", "--config", default="etc/mailappliance.toml", help="TOML config file")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    groups = parser.add_subparsers(dest="group", required=True, metavar="{user,alias}")

    user = groups.add_parser("user", help="subscribers").add_subparsers(dest="action", required=True)
    add = user.add_parser("add", help="add a subscriber")
    add.add_argument("address", help="primary address, e.g. bob@example.org")
    add.add_argument("--uid", help="login name (default: the address's local part)")
    add.add_argument("--name", help="display name")
    secret = add.add_mutually_exclusive_group()
    secret.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    secret.add_argument("--no-password", action="store_true", help="no password (certificate only)")
    add.set_defaults(run=cmd_user_add)

    passwd = user.add_parser("passwd", help="set a subscriber's password")
    passwd.add_argument("login")
    passwd.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    passwd.set_defaults(run=cmd_user_passwd)

    for name, run, text in (
        ("disable", cmd_user_disable, "block logins and incoming mail, keep the entry"),
        ("enable", cmd_user_enable, "undo disable"),
        ("delete", cmd_user_delete, "remove the subscriber (Maildir kept)"),
        ("show", cmd_user_show, "show one subscriber"),
    ):
        sub = user.add_parser(name, help=text)
        sub.add_argument("login", help="uid or address")
        sub.set_defaults(run=run)
    user.add_parser("list", help="list subscribers").set_defaults(run=cmd_user_list)

    alias = groups.add_parser("alias", help="aliases").add_subparsers(dest="action", required=True)
    alias_add = alias.add_parser("add", help="give a subscriber another address")
    alias_add.add_argument("login")
    alias_add.add_argument("alias")
    alias_add.set_defaults(run=cmd_alias_add)
    alias_delete = alias.add_parser("delete", help="remove an alias")
    alias_delete.add_argument("alias")
    alias_delete.set_defaults(run=cmd_alias_delete)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run: Callable[[CommandContext, argparse.Namespace], None] = args.run
    try:
        settings = load_config(args.config)
    except ConfigError as e:
        print(f"mailappliance-admin: configuration error: {e}", file=sys.stderr)
        return EXIT_USAGE
    store = build_store(settings.directory)
    try:
        run(CommandContext(settings, store, args.json), args)
    except DirectoryAdminError as e:
        _fail(args.json, str(e))
        return EXIT_REFUSED
    except DirectoryUnavailable as e:
        _fail(args.json, f"directory unavailable: {e}")
        return EXIT_TEMPFAIL
    finally:
        store.close()
    return EXIT_OK


def _fail(as_json: bool, message: str) -> None:
    if as_json:
        print(json.dumps({"ok": False, "error": message}))
    else:
        print(f"mailappliance-admin: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
