"""``mailappliance-admin`` commands for operating the daemon: check-config,
test-login and the screening lists.  (Directory commands are in admin.py.)"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

from mailappliance.addressing import address_checks
from mailappliance.directory import DirectoryUnavailable

if TYPE_CHECKING:  # admin.py imports this module; Twisted is imported where a command needs it
    from twisted.internet.defer import Deferred
    from twisted.internet.interfaces import IReactorTime

    from mailappliance.admin import CommandContext, Subcommands
    from mailappliance.config import Settings

EXIT_OK, EXIT_REFUSED, EXIT_TEMPFAIL = 0, 1, 75


class UsageError(Exception):
    """The command cannot run as called (exit 2): the message says what to do instead."""


def ask_password(prompt: str) -> str:
    """A password typed at the terminal; without one (a script, a pipe, cron) a
    clear refusal instead of getpass reading stdin with an echo warning or EOFError."""
    if not sys.stdin.isatty():
        raise UsageError("no terminal: use --password-stdin")
    try:
        return getpass.getpass(prompt)
    except EOFError:
        raise UsageError("no password given (end of input): use --password-stdin") from None


# Where the daemon may write under the shipped systemd unit (ProtectSystem=strict + ReadWritePaths=).
UNIT_WRITABLE = (Path("/var/lib/mailappliance"), Path("/var/log/mailappliance"))
# Read-only for the daemon under the unit, and never a place for state.
SYSTEM_DIRECTORIES = (Path("/etc"), Path("/usr"), Path("/boot"), Path("/proc"), Path("/sys"))


def written_paths(settings: Settings) -> list[tuple[str, Path]]:
    """(config key, directory) of everything the daemon writes: storage, a generated
    certificate, the JSON log."""
    paths = [("storage.maildir_root", settings.maildir_root), ("storage.spool_dir", settings.spool_dir)]
    if settings.tls.generate_self_signed and not settings.tls.certificate.exists():
        paths.append(("tls.certificate", settings.tls.certificate.parent))
    if settings.json_log is not None:
        paths.append(("logging.json_file", settings.json_log.parent))
    return paths


def path_problem(path: Path, access: Callable[[Path], bool] = lambda p: os.access(p, os.W_OK),
                 read_only: Callable[[Path], bool] | None = None) -> tuple[str, str] | None:
    """("fail" or "warn", why) when the daemon cannot (or, under the shipped unit, will
    not be allowed to) create and write ``path``; None when it can."""
    if read_only is None:
        read_only = _on_read_only_filesystem
    for system in SYSTEM_DIRECTORIES:
        if path == system or system in path.parents:
            return ("fail", f"{path} is under {system}: state never belongs there (read-only for the daemon "
                            "under the systemd unit); use a path under /var/lib/mailappliance")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return ("fail", f"{path}: {existing} is not a directory")
    if read_only(existing):
        return ("fail", f"{path}: {existing} is on a read-only file system")
    if not access(existing):
        return ("fail", f"{path}: {existing} is not writable" + ("" if existing == path else " (to create it)"))
    if not any(path == allowed or allowed in path.parents for allowed in UNIT_WRITABLE):
        return ("warn", f"{path} is outside /var/lib/mailappliance and /var/log/mailappliance: under the "
                        "shipped systemd unit (ProtectSystem=strict) add it to ReadWritePaths=")
    return None


def _on_read_only_filesystem(path: Path) -> bool:
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)


def _check(name: str, probe: Callable[[], str]) -> dict[str, object]:
    try:
        return {"check": name, "ok": True, "detail": probe()}
    except Exception as e:  # every failure is reported, none stops the others
        return {"check": name, "ok": False, "detail": f"{type(e).__name__}: {e}"}


def cmd_check_config(ctx: CommandContext, args: argparse.Namespace) -> int:
    """Validate what the config points at, the way the daemon will use it."""
    from mailappliance.screening_lists import load_lists
    from mailappliance.tls import ServerTLS
    from mailappliance.web import spool_probe

    s = ctx.settings

    def directory() -> str:
        ctx.store.find_by_login("health-check.invalid")
        where = ", ".join(s.directory.ldap.urls) if s.directory.backend == "ldap" else str(s.directory.ldif_file)
        return f"{s.directory.backend} directory at {where} answers ({len(ctx.store.list_subscribers())} subscribers)"

    def tls() -> str:
        if not s.tls.certificate.exists() and s.tls.generate_self_signed:
            return f"{s.tls.certificate} missing: a self-signed certificate will be generated at start"
        ServerTLS(s.tls.certificate, s.tls.private_key, s.tls.client_ca)
        return f"{s.tls.certificate} and its key load" + (" (client CA too)" if s.tls.client_ca else "")

    def storage() -> str:
        for path in (s.maildir_root, s.spool_dir):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        spool_probe(s.spool_dir)
        return f"{s.spool_dir} is writable and fsyncs; Maildirs in {s.maildir_root}"

    def screening() -> str:
        if s.screening.file is None:
            return "no screening file configured"
        lists = load_lists(s.screening.file)
        return (f"{s.screening.file}: {len(lists.block_networks)} blocked networks, "
                f"{len(lists.block_client_domains)} blocked client domains, {len(lists.dnsbl_zones)} DNSBL zones")

    results: list[dict[str, object]] = [{"check": "config", "ok": True, "detail": f"{s.source} is valid"}]
    paths_ok = True
    for key, path in written_paths(s):
        problem = path_problem(path)
        if problem is not None:
            paths_ok = paths_ok and problem[0] != "fail"
            results.append({"check": "paths", "ok": problem[0] != "fail", "warn": problem[0] == "warn",
                            "detail": f"{key}: {problem[1]}"})
    probes = [("directory", directory), ("tls", tls), ("storage", storage), ("screening", screening)]
    results += [_check(name, probe) for name, probe in probes if paths_ok or name not in ("tls", "storage")]
    if s.directory.backend == "ldif":
        from mailappliance.directory.ldif import mode_problem

        mode_warning = mode_problem(s.directory.ldif_file)  # a warning: the daemon still works
        if mode_warning:
            results.append({"check": "ldif-mode", "ok": True, "warn": True, "detail": mode_warning})
    results += address_checks(s, ctx.store)  # catch-alls, postmaster@/abuse@ mailboxes, SRS keys
    if ctx.as_json:
        print(json.dumps(results))
    else:
        for r in results:
            status = "warn" if r.get("warn") else "ok  " if r["ok"] else "FAIL"
            print(f"{status} {r['check']:<10} {r['detail']}")
    return EXIT_OK if all(r["ok"] for r in results) else EXIT_REFUSED


class LoginReport(TypedDict, total=False):
    """What test-login found (printed as JSON with --json)."""

    ok: bool
    uid: str
    mail: str
    aliases: list[str]
    refused: str  # the checker's reason (for the admin, never for the client)
    temporary: str  # directory trouble: the daemon would answer 454 / [SYS/TEMP]


def cmd_test_login(ctx: CommandContext, args: argparse.Namespace) -> int:
    """Run THE shared checker exactly as the daemon would (cache, throttle, directory)."""
    from twisted.internet.interfaces import IReactorFromThreads

    from mailappliance.credentials import ClientPassword, LoginRefused, LoginThrottled, SubscriberChecker
    from mailappliance.directory.threaded import Directory
    from mailappliance.throttle import AuthThrottle

    password = sys.stdin.readline().rstrip("\r\n") if args.password_stdin else ask_password("Password: ")
    outcome: LoginReport = {}

    async def attempt(reactor: IReactorTime) -> None:
        directory = Directory(ctx.store, IReactorFromThreads(reactor), 1)  # (I(x) is x: the reactor)
        directory.start()
        checker = SubscriberChecker(directory, ctx.settings.auth_cache_ttl, reactor,
                                    AuthThrottle(ctx.settings.throttle, reactor))
        try:
            subscriber = await checker.requestAvatarId(ClientPassword(args.login.encode(), password.encode(),
                                                                      "test-login"))
            outcome.update({"ok": True, "uid": subscriber.uid, "mail": subscriber.mail,
                            "aliases": list(subscriber.aliases)})
        except (LoginRefused, LoginThrottled) as e:
            outcome.update({"ok": False, "refused": e.reason})
        except DirectoryUnavailable as e:
            outcome.update({"ok": False, "temporary": str(e)})
        finally:
            directory.stop()

    _run_reactor(attempt)
    if ctx.as_json:
        print(json.dumps(outcome))
    elif outcome.get("ok"):
        print(f"ok: {args.login} is uid={outcome['uid']} <{outcome['mail']}>")
    elif "refused" in outcome:
        print(f"refused: {outcome['refused']}")
    else:
        print(f"temporary failure (the daemon would answer 454 / [SYS/TEMP]): {outcome['temporary']}")
    if outcome.get("ok"):
        return EXIT_OK
    return EXIT_REFUSED if "refused" in outcome else EXIT_TEMPFAIL


def _run_reactor(coroutine_function: Callable[[IReactorTime], Coroutine[Deferred[object], object, None]]) -> None:
    """Run one coroutine on a fresh reactor (the CLI is a short-lived process)."""
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred

    def start() -> None:
        d = Deferred.fromCoroutine(coroutine_function(reactor))
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    # IReactorCore.run is typed without arguments; the installed reactor's run takes this one.
    reactor.run(installSignalHandlers=False)  # type: ignore[call-arg]


# -- screening lists -----------------------------------------------------------

LIST_KEYS = ("allow.networks", "allow.client_domains", "allow.senders", "block.networks",
             "block.client_domains", "block.helo", "block.senders", "dnsbl.zones")


def _screening_file(ctx: CommandContext) -> Path:
    file = ctx.settings.screening.file
    if file is None:
        from mailappliance.directory import InvalidAddress

        raise InvalidAddress(f"no screening file: set [screening] file in {ctx.settings.source}")
    return file


def _read_raw(file: Path) -> dict[str, dict[str, list[str]]]:
    import tomllib

    if not file.exists():
        return {}
    with open(file, "rb") as f:
        return tomllib.load(f)


def _write_raw(file: Path, data: dict[str, dict[str, list[str]]]) -> None:
    """Rewrite the file (atomically); the daemon notices the change within a second."""
    from mailappliance.screening_lists import ScreeningFileError, parse_lists

    try:
        parse_lists(file, data)  # never write something the daemon would refuse
    except ScreeningFileError as e:
        from mailappliance.directory import InvalidAddress

        raise InvalidAddress(str(e).replace(f"{file}: ", "")) from None
    lines = ["# mailappliance screening lists; rewritten by `mailappliance-admin screening`",
             "# (comments are not kept). See docs/admin.md, section 8."]
    for section in ("allow", "block", "dnsbl"):
        table = data.get(section, {})
        if table:
            lines.append(f"\n[{section}]")
            for key, values in table.items():
                lines.append(f"{key} = [" + ", ".join(json.dumps(v) for v in values) + "]")
    staged = file.with_name(f".{file.name}.tmp")
    staged.write_text("\n".join(lines) + "\n")
    staged.replace(file)


def cmd_screening_list(ctx: CommandContext, args: argparse.Namespace) -> int:
    data = _read_raw(_screening_file(ctx))
    flat = {key: data.get(key.split(".")[0], {}).get(key.split(".")[1], []) for key in LIST_KEYS}
    if ctx.as_json:
        print(json.dumps(flat))
    else:
        for key, values in flat.items():
            print(f"{key:<22} {', '.join(values) if values else '-'}")
    return EXIT_OK


def cmd_screening_change(ctx: CommandContext, args: argparse.Namespace) -> int:
    file = _screening_file(ctx)
    data = _read_raw(file)
    section, key = args.list.split(".")
    values = data.setdefault(section, {}).setdefault(key, [])
    value = args.value.strip().lower()
    if args.action == "add":
        if value in values:
            from mailappliance.directory import DuplicateEntry

            raise DuplicateEntry(f"{value} is already in {args.list}")
        values.append(value)
    else:
        if value not in values:
            from mailappliance.directory import NoSuchSubscriber

            raise NoSuchSubscriber(f"{value} is not in {args.list}")
        values.remove(value)
    _write_raw(file, data)
    ctx.done(f"{args.list}: {'added' if args.action == 'add' else 'removed'} {value} "
             "(the daemon re-reads the file within a second)")
    return EXIT_OK


def add_parsers(groups: Subcommands) -> None:
    check = groups.add_parser("check-config", help="validate the config and reach what it names")
    check.set_defaults(run=cmd_check_config)
    login = groups.add_parser("test-login", help="check a login with the daemon's own credential checker")
    login.add_argument("login")
    login.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    login.set_defaults(run=cmd_test_login)
    screening = groups.add_parser("screening", help="the screening lists").add_subparsers(
        dest="action", required=True)
    screening.add_parser("list", help="show every list").set_defaults(run=cmd_screening_list)
    for action in ("add", "remove"):
        sub = screening.add_parser(action, help=f"{action} an entry")
        sub.add_argument("list", choices=LIST_KEYS)
        sub.add_argument("value")
        sub.set_defaults(run=cmd_screening_change)
