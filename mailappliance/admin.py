"""``mailappliance-admin``: manage subscribers, aliases and certificates in either backend.

Works on the directory named in the config file.  For LDAP it binds as
``directory.ldap.admin_bind_dn`` and sets passwords with the Password Modify
extended operation, so slapd hashes them with its own policy.

The config file is ``-c FILE``, else ``$MAILAPPLIANCE_CONFIG``, else
``/etc/mailappliance/mailappliance.toml``; errors about it say which one was
used and how it was chosen.  Global options (``-c``, ``--json``) may stand
anywhere on the command line.

Exit codes: 0 done, 1 refused (duplicate, unknown user, bad address),
2 usage or configuration error, 75 directory temporarily unavailable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from mailappliance import dkim_admin
from mailappliance.addresses import is_safe_mailbox_name, normalize_address, validate_display_name, validate_uid
from mailappliance.admin_ops import UsageError, add_parsers, ask_password
from mailappliance.config import ConfigError, Settings, load_config
from mailappliance.directory import (
    DirectoryAdminError,
    DirectoryStore,
    DirectoryUnavailable,
    DuplicateEntry,
    InvalidAddress,
    NoSuchSubscriber,
    Subscriber,
)
from mailappliance.directory.backends import build_store
from mailappliance.directory.passwords import validate_new_password
from mailappliance.quota import mailbox_usage

if TYPE_CHECKING:
    from mailappliance.queue.spool import Envelope, OutboundSpool  # imported where used: most commands never need it

    Subcommands = argparse._SubParsersAction[argparse.ArgumentParser]  # what add_subparsers() returns

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_TEMPFAIL = 0, 1, 2, 75

DEFAULT_CONFIG = Path("/etc/mailappliance/mailappliance.toml")
CONFIG_ENVIRONMENT = "MAILAPPLIANCE_CONFIG"


def config_location(given: str | None) -> tuple[Path, str]:
    """The config file to use and how it was chosen (for error messages):
    ``-c``, then ``$MAILAPPLIANCE_CONFIG``, then the system default."""
    if given:
        return Path(given), "given with -c"
    from_environment = os.environ.get(CONFIG_ENVIRONMENT, "")
    if from_environment:
        return Path(from_environment), f"from {CONFIG_ENVIRONMENT}"
    return DEFAULT_CONFIG, "the default"


class CommandContext:
    """What a subcommand gets: settings, the store, and how to print.

    Commands that manage the directory get both; ``backup`` gets settings
    only, ``directory setup`` and ``restore`` neither (they load what they need)."""

    def __init__(self, settings: Settings | None, store: DirectoryStore | None, as_json: bool,
                 config_path: Path | None = None, config_how: str = "") -> None:
        self._settings = settings
        self._store = store
        self.as_json = as_json
        self.config_path = config_path
        self.config_how = config_how

    @property
    def settings(self) -> Settings:
        """The loaded config (not for ``needs="path"`` or ``"nothing"`` commands)."""
        assert self._settings is not None, "this command runs without the config"
        return self._settings

    @property
    def store(self) -> DirectoryStore:
        """The directory (only for ``needs="store"`` commands, the default)."""
        assert self._store is not None, "this command runs without the directory"
        return self._store

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

    def done(self, message: str, **fields: object) -> None:
        if self.as_json:
            print(json.dumps({"ok": True, **fields}))
        else:
            print(message)


def _subscriber_fields(s: Subscriber) -> dict[str, object]:
    return {
        "uid": s.uid, "mail": s.mail, "aliases": list(s.aliases), "name": s.display_name,
        "disabled": s.disabled, "certificates": len(s.certificates), "dn": s.dn,
    }


def _read_password(args: argparse.Namespace) -> str:
    """The new password (stdin or asked twice), validated and normalised."""
    try:
        if args.password_stdin:
            password = sys.stdin.readline().rstrip("\r\n")
        else:
            password = ask_password("New password: ")
            if ask_password("Repeat password: ") != password:
                raise InvalidAddress("the two passwords differ")
    except UnicodeDecodeError:
        raise InvalidAddress("the password is not valid UTF-8") from None
    return validate_new_password(password)


def cmd_user_add(ctx: CommandContext, args: argparse.Namespace) -> None:
    mail = ctx.local_address(args.address)
    uid = validate_uid(args.uid or mail.split("@", 1)[0])
    name = validate_display_name(args.name or "")
    password = None if args.no_password else _read_password(args)
    subscriber = ctx.store.add_subscriber(uid, mail, password, name)
    ctx.done(f"added {subscriber.uid} <{subscriber.mail}>", subscriber=_subscriber_fields(subscriber))


def cmd_user_passwd(ctx: CommandContext, args: argparse.Namespace) -> None:
    ctx.store.set_password(args.login, _read_password(args))
    ctx.done(f"password changed for {args.login}")


def cmd_user_disable(ctx: CommandContext, args: argparse.Namespace) -> None:
    ctx.store.set_disabled(args.login, True)
    ctx.done(f"disabled {args.login}: logins refused, mail refused with 550 5.2.1")


def cmd_user_enable(ctx: CommandContext, args: argparse.Namespace) -> None:
    ctx.store.set_disabled(args.login, False)
    lifted = dkim_admin.lift_suspension(ctx.settings, _subscriber(ctx, args.login).uid)  # outgoing-spam suspension
    ctx.done(f"enabled {args.login}" + ("; submission suspension lifted" if lifted else ""))


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
    subscriber = _subscriber(ctx, args.login)
    fields = _subscriber_fields(subscriber)
    usage = mailbox_usage(ctx.settings.maildir_root, subscriber, ctx.settings.mailbox_quota)
    if ctx.as_json:
        print(json.dumps({**fields, "quota_used": usage.used, "quota_limit": usage.limit,
                          **dkim_admin.suspension_fields(ctx.settings, subscriber.uid)}))
    else:
        for key, value in fields.items():
            print(f"{key + ':':<14} {', '.join(value) if isinstance(value, list) else value}")
        print(f"{'quota:':<14} {usage.describe()}")
        suspended = dkim_admin.describe_suspension(ctx.settings, subscriber.uid)
        if suspended:
            print(f"{'submission:':<14} {suspended}")


def cmd_alias_add(ctx: CommandContext, args: argparse.Namespace) -> None:
    alias = ctx.local_address(args.alias)
    ctx.store.add_alias(args.login, alias)
    ctx.done(f"alias {alias} now delivers to {args.login}")


def cmd_alias_delete(ctx: CommandContext, args: argparse.Namespace) -> None:
    alias = normalize_address(args.alias)
    ctx.store.delete_alias(alias)
    ctx.done(f"alias {alias} removed")


def _certificate_from(path: str) -> bytes:
    from mailappliance.certificates import load_certificate_der

    try:
        return load_certificate_der(Path(path))
    except OSError as e:
        raise InvalidAddress(f"cannot read {path}: {e.strerror}") from None
    except ValueError as e:
        raise InvalidAddress(f"{path}: {e}") from None


def _subscriber(ctx: CommandContext, login: str) -> Subscriber:
    subscriber = ctx.store.find_by_login(login) or ctx.store.find_by_address(login)
    if subscriber is None:
        raise NoSuchSubscriber(f"no subscriber with login or address {login!r}")
    return subscriber


def cmd_cert_add(ctx: CommandContext, args: argparse.Namespace) -> None:
    from mailappliance.certificates import describe_certificate

    der = _certificate_from(args.file)
    ctx.store.add_certificate(args.login, der)
    info = describe_certificate(der)
    ctx.done(f"certificate {info['sha256']} ({info['subject']}) now logs in {args.login}", certificate=info)


def cmd_cert_revoke(ctx: CommandContext, args: argparse.Namespace) -> None:
    ctx.store.remove_certificate(args.login, _certificate_from(args.file))
    ctx.done(f"certificate removed from {args.login}; it no longer logs anyone in")


def cmd_cert_list(ctx: CommandContext, args: argparse.Namespace) -> None:
    from mailappliance.certificates import describe_certificate

    subscriber = _subscriber(ctx, args.login)
    infos = [describe_certificate(der) for der in subscriber.certificates]
    if ctx.as_json:
        print(json.dumps(infos, default=str))
        return
    for info in infos:
        print(f"{info['sha256']}  {info['subject']}  issuer: {info['issuer']}  "
              f"valid {info['not_before']} .. {info['not_after']}")
    print(f"{len(infos)} certificate(s) for {subscriber.uid}")


def cmd_cert_issue(ctx: CommandContext, args: argparse.Namespace) -> None:
    from mailappliance.certificates import issue_client_certificate

    tls = ctx.settings.tls
    if tls.client_ca is None or tls.client_ca_key is None:
        raise InvalidAddress(
            f"cert issue needs tls.client_ca and tls.client_ca_key in {ctx.settings.source}"
        )
    subscriber = _subscriber(ctx, args.login)
    key_pem, cert_pem = issue_client_certificate(
        tls.client_ca, tls.client_ca_key, subscriber.display_name or subscriber.uid, subscriber.mail, args.days
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    key_path, cert_path = out / f"{subscriber.uid}.key", out / f"{subscriber.uid}.pem"
    if key_path.exists() or cert_path.exists():
        raise DuplicateEntry(f"{key_path} or {cert_path} exists already; move it away first")
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem)
    cert_path.write_bytes(cert_pem)
    ctx.store.add_certificate(subscriber.uid, _certificate_from(str(cert_path)))
    ctx.done(f"issued {cert_path} and {key_path} for {subscriber.uid}; the certificate is stored in the "
             "directory. Give both files to the subscriber (see docs/subscribers.md).",
             certificate=str(cert_path), key=str(key_path))


def _spool(ctx: CommandContext) -> OutboundSpool:
    from mailappliance.queue.spool import OutboundSpool

    return OutboundSpool(ctx.settings.spool_dir)


def _queue_id(text: str) -> str:
    """A queue id from the command line: one file name in the queue, never a path."""
    if not is_safe_mailbox_name(text):
        raise NoSuchSubscriber(f"no queued message {text!r}")
    return text


def _age(seconds: float) -> str:
    """``3d04h``, ``2h05m``, ``4m09s`` or ``7s``."""
    minutes, secs = divmod(max(0, int(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _queue_entries(ctx: CommandContext) -> list[Envelope]:
    from mailappliance.queue.spool import QueueEntryCorrupt, QueueEntryGone

    spool = _spool(ctx)
    entries: list[Envelope] = []
    for queue_id in spool.queued_ids():
        try:
            entries.append(spool.envelope(queue_id))
        except (QueueEntryGone, QueueEntryCorrupt):  # delivered meanwhile; unreadable: the daemon sets it aside
            continue
    return entries


def cmd_queue_list(ctx: CommandContext, args: argparse.Namespace) -> None:
    import time

    now, entries = time.time(), _queue_entries(ctx)
    oldest = max((now - e.received_at for e in entries), default=0)
    corrupt_dir = _spool(ctx).corrupt_dir
    corrupt = len(os.listdir(corrupt_dir)) if corrupt_dir.is_dir() else 0
    if ctx.as_json:
        print(json.dumps({"size": len(entries), "oldest_age_seconds": round(oldest), "corrupt_files": corrupt,
                          "messages": [e.to_json() for e in entries]}))
        return
    for e in entries:
        pending = len(e.pending())
        last = next((r for r in e.recipients if r.last_text), None)
        reason = f"  last: {last.last_code} {last.last_text}" if last else ""
        print(f"{e.queue_id}  age {_age(now - e.received_at):>8}  from <{e.sender}>  "
              f"{pending}/{len(e.recipients)} pending  next in {_age(e.next_attempt - now)}{reason}")
    print(f"{len(entries)} message(s) queued, oldest {_age(oldest)}")
    if corrupt:
        print(f"{corrupt} file(s) set aside in {corrupt_dir} (unreadable, or their message file vanished; "
              "the daemon's log says why)")


def cmd_queue_show(ctx: CommandContext, args: argparse.Namespace) -> None:
    import time

    from mailappliance.queue.spool import QueueEntryCorrupt, QueueEntryGone

    spool = _spool(ctx)
    try:
        envelope = spool.envelope(_queue_id(args.id))
        state = spool.state_of(envelope.queue_id)
    except QueueEntryGone:
        raise NoSuchSubscriber(f"no queued message {args.id!r}") from None
    except QueueEntryCorrupt as e:
        raise NoSuchSubscriber(f"queued message {args.id!r} is unreadable: {e}") from None
    if ctx.as_json:
        print(json.dumps(envelope.to_json()))
        return
    print(f"id:            {envelope.queue_id}\nfrom:          <{envelope.sender}>")
    print(f"state:         {state}, next attempt in "
          f"{_age(envelope.next_attempt - time.time())}")
    print(f"submitted by:  {envelope.authenticated_as or '-'} from [{envelope.client_ip}] "
          f"session {envelope.session_id}\nattempts:      {envelope.attempts}")
    for r in envelope.recipients:
        print(f"  <{r.address}>  {r.state}  attempts {r.attempts}  {r.remote_host}  "
              f"{r.last_code or ''} {r.last_text}".rstrip())
    try:
        head = spool.read_message(envelope.queue_id).split(b"\r\n\r\n", 1)[0]
    except QueueEntryGone:
        head = b"(the message file is gone)"
    print("headers:\n" + head.decode("utf-8", "replace"))


def cmd_queue_retry(ctx: CommandContext, args: argparse.Namespace) -> None:
    from mailappliance.queue.spool import QueueEntryGone

    spool = _spool(ctx)
    ids = [_queue_id(args.id)] if args.id else spool.queued_ids()
    for queue_id in ids:
        try:
            spool.retry(queue_id)  # back into incoming/, which a running daemon watches
        except QueueEntryGone:
            if args.id:
                raise NoSuchSubscriber(f"no queued message {queue_id!r}") from None
    ctx.done(f"{len(ids)} message(s) due now; the daemon tries them within a second or two",
             retried=ids)


def cmd_queue_delete(ctx: CommandContext, args: argparse.Namespace) -> None:
    from mailappliance.queue.spool import QueueEntryGone

    try:
        _spool(ctx).remove(_queue_id(args.id))
    except QueueEntryGone:
        raise NoSuchSubscriber(f"no queued message {args.id!r}") from None
    ctx.done(f"deleted {args.id} from the queue (no report is sent)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailappliance-admin", description="Manage mailappliance subscribers and aliases."
    )
    _add_global_options(parser, None)
    groups = parser.add_subparsers(
        dest="group", required=True,
        metavar="{user,alias,cert,queue,screening,check-config,test-login,directory,backup,restore,dkim,dns}")

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

    cert = groups.add_parser("cert", help="client certificates").add_subparsers(dest="action", required=True)
    for name, run, text in (
        ("add", cmd_cert_add, "store a certificate (PEM or DER file) so it logs the subscriber in"),
        ("revoke", cmd_cert_revoke, "remove a stored certificate"),
    ):
        sub = cert.add_parser(name, help=text)
        sub.add_argument("login")
        sub.add_argument("file")
        sub.set_defaults(run=run)
    cert_list = cert.add_parser("list", help="a subscriber's certificates")
    cert_list.add_argument("login")
    cert_list.set_defaults(run=cmd_cert_list)
    issue = cert.add_parser("issue", help="create a key and a certificate signed by tls.client_ca_key")
    issue.add_argument("login")
    issue.add_argument("--out", default=".", help="directory for <uid>.key and <uid>.pem")
    issue.add_argument("--days", type=int, default=825, help="validity in days")
    issue.set_defaults(run=cmd_cert_issue)

    queue = groups.add_parser("queue", help="the outbound queue").add_subparsers(dest="action", required=True)
    queue.add_parser("list", help="queued messages, size and oldest age").set_defaults(run=cmd_queue_list)
    show = queue.add_parser("show", help="one message's envelope, states and headers")
    show.add_argument("id")
    show.set_defaults(run=cmd_queue_show)
    retry = queue.add_parser("retry", help="make one (or every) message due now")
    retry.add_argument("id", nargs="?")
    retry.set_defaults(run=cmd_queue_retry)
    delete = queue.add_parser("delete", help="drop a message without a report")
    delete.add_argument("id")
    delete.set_defaults(run=cmd_queue_delete)
    add_parsers(groups)
    dkim_admin.add_parsers(groups)  # dkim keygen|list|check, dns DOMAIN
    _add_operations_parsers(groups)
    _global_options_everywhere(parser)
    return parser


def _add_operations_parsers(groups: Subcommands) -> None:
    """``directory setup``, ``backup`` and ``restore``: the machine, not single subscribers."""
    from mailappliance.backup import cmd_backup
    from mailappliance.directory_setup import DEBIAN_LDAPI, cmd_directory_setup
    from mailappliance.restore import cmd_restore

    directory = groups.add_parser("directory", help="the LDAP server").add_subparsers(dest="action", required=True)
    setup = directory.add_parser(
        "setup", help="make the local slapd ready: schema, tree, accounts, ACLs, indexes (as root, idempotent)")
    setup.add_argument("--ldapi", default="ldapi:///", metavar="URL",
                       help=f"slapd's local socket (default ldapi:///, which is {DEBIAN_LDAPI})")
    setup.add_argument("--group", default="mailappliance",
                       help="the daemon's group: may read the service password file (default mailappliance)")
    setup.add_argument("--schema-dir", default="/etc/ldap/schema", help="where slapd's schema LDIF files are")
    setup.add_argument("--replace-acls", action="store_true",
                       help="replace ACLs of the database that this command did not write")
    setup.add_argument("--create-database", action="store_true",
                       help="if slapd has no database for base_dn's suffix, create one (next to the existing one)")
    setup.set_defaults(run=cmd_directory_setup, needs="path")

    backup = groups.add_parser(
        "backup", help="copy the directory, Maildirs, queue, config and keys into DIR (safe while running)")
    backup.add_argument("dir", help="a new or empty directory")
    backup.add_argument("--slapd-config", default="/etc/ldap/slapd.d", metavar="DIR",
                        help="the local slapd's cn=config directory, dumped with slapcat (default /etc/ldap/slapd.d)")
    backup.set_defaults(run=cmd_backup, needs="settings")
    restore = groups.add_parser(
        "restore", help="put a backup back where it came from (only into an empty layout unless --force)")
    restore.add_argument("dir", help="a directory made by backup")
    restore.add_argument("--force", action="store_true", help="overwrite files and merge into non-empty directories")
    restore.set_defaults(run=cmd_restore, needs="nothing")


def _add_global_options(parser: argparse.ArgumentParser, default: str | None) -> None:
    parser.add_argument("-c", "--config", default=default, metavar="FILE",
                        help=f"TOML config file (default: ${CONFIG_ENVIRONMENT}, else {DEFAULT_CONFIG})")
    parser.add_argument("--json", action="store_true", default=default if default is argparse.SUPPRESS else False,
                        help="machine-readable output")


def _global_options_everywhere(parser: argparse.ArgumentParser) -> None:
    """Accept ``-c`` and ``--json`` after the subcommand too (``user list --json``).
    Below the top level they default to SUPPRESS, so they only override when given."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                if not any(a.dest == "config" for a in sub._actions):
                    _add_global_options(sub, argparse.SUPPRESS)
                _global_options_everywhere(sub)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run: Callable[[CommandContext, argparse.Namespace], int | None] = args.run
    as_json: bool = args.json
    config_path, how = config_location(args.config)
    needs = getattr(args, "needs", "store")
    store: DirectoryStore | None = None
    try:
        settings = load_config(config_path) if needs in ("store", "settings") else None
        if settings is not None and needs == "store":
            store = build_store(settings.directory)
        code = run(CommandContext(settings, store, as_json, config_path, how), args)
    except ConfigError as e:
        print(f"mailappliance-admin: configuration error: {e} ({_config_note(config_path, how)})",
              file=sys.stderr)
        return EXIT_USAGE
    except UsageError as e:
        _fail(as_json, str(e))
        return EXIT_USAGE
    except DirectoryAdminError as e:
        _fail(as_json, str(e))
        return EXIT_REFUSED
    except DirectoryUnavailable as e:
        _fail(as_json, f"directory unavailable: {e} (directory of {config_path})")
        return EXIT_TEMPFAIL
    finally:
        if store is not None:
            store.close()
            note = getattr(store, "mode_note", None)  # LDIF: the file's mode was (or must be) tightened
            if note:
                print(f"mailappliance-admin: note: {note}", file=sys.stderr)
    return code or EXIT_OK


def _config_note(path: Path, how: str) -> str:
    """Which config file was used and how to pick another."""
    return (f"config file {path}, {how}; choose another with -c FILE or {CONFIG_ENVIRONMENT}=FILE")


def _fail(as_json: bool, message: str) -> None:
    if as_json:
        print(json.dumps({"ok": False, "error": message}))
    else:
        print(f"mailappliance-admin: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
