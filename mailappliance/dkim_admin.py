"""``mailappliance-admin dkim keygen|list|check`` and ``mailappliance-admin dns DOMAIN``;
the outgoing-spam suspension lines of ``user show`` and its lifting by ``user enable``.

Exit codes as in admin.py: 0 done, 1 refused (a record missing or wrong),
2 usage, 75 DNS temporarily unavailable.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypedDict

from mailappliance.config import Settings
from mailappliance.filter.suspension import clear_suspension, read_suspension
from mailappliance.msgauth import keys as dkim_keys

if TYPE_CHECKING:  # admin.py imports this module
    from mailappliance.admin import CommandContext, Subcommands

Command = Callable[["CommandContext", argparse.Namespace], int]

EXIT_REFUSED, EXIT_USAGE, EXIT_TEMPFAIL = 1, 2, 75


class AdminUsageError(Exception):
    pass


class _KeyState(TypedDict):
    """One key in ``dkim check``'s report."""

    selector: str
    type: str
    signing: bool
    name: str
    state: str
    expected: str


def _domain(ctx: CommandContext, text: str) -> str:
    domain = text.strip().lower().rstrip(".")
    if domain not in ctx.settings.local_domains:
        raise AdminUsageError(f"{domain!r} is not in server.local_domains "
                              f"({', '.join(ctx.settings.local_domains)}) of {ctx.settings.source}")
    return domain


def zone_line(name: str, text: str) -> str:
    """A TXT record in zone-file syntax, split into 255-octet strings."""
    parts = [text[i:i + 255] for i in range(0, len(text), 255)]
    quoted = " ".join(f'"{p}"' for p in parts)
    return f"{name}. IN TXT ( {quoted} )" if len(parts) > 1 else f"{name}. IN TXT {quoted}"


def _owner(ctx: CommandContext, args: argparse.Namespace) -> tuple[int, int] | None:
    """The service user: --owner, else whoever owns the spool (the daemon hands it over at start)."""
    if args.owner:
        import grp
        import pwd

        entry = pwd.getpwnam(args.owner)
        return entry.pw_uid, grp.getgrgid(entry.pw_gid).gr_gid
    try:
        info = ctx.settings.spool_dir.stat()
    except OSError:
        return None
    return info.st_uid, info.st_gid


def cmd_dkim_keygen(ctx: CommandContext, args: argparse.Namespace) -> int:
    domain = _domain(ctx, args.domain)
    types = ["ed25519", "rsa"] if args.type == "both" else [args.type]
    if args.selector and len(types) > 1:
        raise AdminUsageError("one key per selector: give --type ed25519 or --type rsa with --selector")
    stamp = time.strftime("%Y%m")
    written = []
    for key_type in types:
        selector = args.selector or f"m{stamp}{key_type[0]}"
        if not dkim_keys.is_selector(selector):
            raise AdminUsageError(f"{selector!r} is not a selector (letters, digits, '-', '.')")
        if (ctx.settings.dkim.key_dir / domain / f"{selector}.key").exists():
            raise AdminUsageError(f"selector {selector} of {domain} exists already; choose another --selector")
        key = dkim_keys.generate(key_type)
        path = dkim_keys.write_key(ctx.settings.dkim.key_dir, domain, selector, key, _owner(ctx, args))
        _, record = dkim_keys.dns_record(key)
        written.append({"domain": domain, "selector": selector, "type": key_type, "file": str(path),
                        "name": f"{selector}._domainkey.{domain}", "record": record})
    if ctx.as_json:
        print(json.dumps({"ok": True, "keys": written}))
        return 0
    for k in written:
        print(f"wrote {k['file']} ({k['type']}, mode 0600); publish:\n  {zone_line(k['name'], k['record'])}")
    print("Publish the record(s), check with 'mailappliance-admin dkim check "
          f"{domain}', then send SIGHUP: the daemon signs with the newest key of each type "
          "(or the selectors in [dkim] selectors) from its next start or SIGHUP.")
    return 0


def _infos(ctx: CommandContext) -> tuple[list[dkim_keys.KeyInfo], dict[str, list[dkim_keys.KeyInfo]], list[str]]:
    found, problems = dkim_keys.scan(ctx.settings.dkim.key_dir, ctx.settings.local_domains)
    active = dkim_keys.active(found, dict(ctx.settings.dkim.selectors)) if ctx.settings.dkim.sign else {}
    return found, active, problems


def cmd_dkim_list(ctx: CommandContext, args: argparse.Namespace) -> int:
    found, active, problems = _infos(ctx)
    in_use = {(k.domain, k.selector) for keys in active.values() for k in keys}
    rows = [{"domain": k.domain, "selector": k.selector, "type": k.key_type, "file": str(k.path),
             "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(k.modified)),
             "signing": (k.domain, k.selector) in in_use, "name": f"{k.selector}._domainkey.{k.domain}",
             "record": k.public_record} for k in found]
    if ctx.as_json:
        print(json.dumps({"keys": rows, "problems": problems}))
        return 0
    for row in rows:
        mark = "signing" if row["signing"] else "idle"
        print(f"{row['domain']:<24} {row['selector']:<16} {row['type']:<8} {mark:<8} {row['created']}  {row['file']}")
    for problem in problems:
        print(f"unusable: {problem}")
    unsigned = [d for d in ctx.settings.local_domains if d not in active]
    if unsigned:
        print(f"not signing (no key): {', '.join(unsigned)}")
    print(f"{len(rows)} key(s)")
    return 0


def _lookup_txt(ctx: CommandContext, name: str) -> list[str] | None:
    """TXT records at ``name`` from the configured resolver ([queue] resolver) or the
    system's; [] when there are none; None when the lookup failed."""
    import dns.exception
    import dns.resolver

    address = ctx.settings.queue.resolver
    if address:
        host, _, port = address.rpartition(":")
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [host.strip("[]")]
        resolver.port = int(port)
    else:
        resolver = dns.resolver.Resolver()
    resolver.lifetime = 10
    try:
        answer = resolver.resolve(name, "TXT")
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    except dns.exception.DNSException:
        return None
    return [b"".join(r.strings).decode("utf-8", "replace") for r in answer]


def _p_value(record: str) -> str:
    tags = dict(part.strip().partition("=")[::2] for part in record.split(";") if "=" in part)
    return "".join(tags.get("p", "").split())


def cmd_dkim_check(ctx: CommandContext, args: argparse.Namespace) -> int:
    domain = _domain(ctx, args.domain)
    found, active, _ = _infos(ctx)
    mine = [k for k in found if k.domain == domain]
    if not mine:
        raise AdminUsageError(f"no DKIM key for {domain}; make one with 'mailappliance-admin dkim keygen {domain}'")
    in_use = {k.selector for k in active.get(domain, [])}
    report: list[_KeyState] = []
    worst = 0
    for key in mine:
        name = f"{key.selector}._domainkey.{domain}"
        published = _lookup_txt(ctx, name)
        if published is None:
            state, code = "lookup failed (try again)", EXIT_TEMPFAIL
        elif not published:
            state, code = "NOT published", EXIT_REFUSED
        elif any(_p_value(r) == _p_value(key.public_record) for r in published):
            state, code = "published, matches", 0
        else:
            state, code = "published with a DIFFERENT key", EXIT_REFUSED
        if key.selector not in in_use and code == EXIT_REFUSED:
            code = 0  # an idle key need not be published (yet, or any more)
        worst = max(worst, code) if code != EXIT_TEMPFAIL or worst == 0 else worst
        report.append({"selector": key.selector, "type": key.key_type, "signing": key.selector in in_use,
                       "name": name, "state": state, "expected": key.public_record})
    if ctx.as_json:
        print(json.dumps({"domain": domain, "ok": worst == 0, "keys": report}))
        return worst
    for r in report:
        print(f"{r['name']:<44} {r['type']:<8} {'signing' if r['signing'] else 'idle':<8} {r['state']}")
        if r["state"] != "published, matches" and r["signing"]:
            print(f"  expected: {zone_line(r['name'], r['expected'])}")
    return worst


def cmd_dns(ctx: CommandContext, args: argparse.Namespace) -> int:
    """The records a local domain needs for this appliance, in zone-file syntax."""
    domain = _domain(ctx, args.domain)
    host = ctx.settings.hostname.rstrip(".")
    ports = {listener.role: listener.port for listener in ctx.settings.listeners}
    _, active, _ = _infos(ctx)
    lines = [f"; records for {domain} served by {host} (from {ctx.settings.source})",
             f"{domain}. IN MX 10 {host}.",
             zone_line(domain, f"v=spf1 mx a:{host} -all")]
    for key in active.get(domain, []):
        lines.append(zone_line(f"{key.selector}._domainkey.{domain}", key.public_record))
    if not active.get(domain):
        lines.append(f"; no DKIM key: mailappliance-admin dkim keygen {domain}")
    lines.append(zone_line(f"_dmarc.{domain}", f"v=DMARC1; p=quarantine; rua=mailto:postmaster@{domain}"))
    for name in ("autoconfig", "autodiscover"):
        lines.append(f"{name}.{domain}. IN CNAME {host}.")
    srv = [("_submission._tcp", "submission", 587), ("_submissions._tcp", "submissions", 465),
           ("_pop3._tcp", "pop3", 110), ("_pop3s._tcp", "pop3s", 995)]
    for name, role, default in srv:  # RFC 6186 (and RFC 8314 for submissions)
        if role in ports:
            lines.append(f"{name}.{domain}. IN SRV 0 1 {default if ports[role] == default else ports[role]} {host}.")
        else:
            lines.append(f"{name}.{domain}. IN SRV 0 0 0 .")
    for name in ("_imap._tcp", "_imaps._tcp"):
        lines.append(f"{name}.{domain}. IN SRV 0 0 0 .  ; no IMAP here (RFC 6186 4)")
    policy_id = time.strftime("%Y%m%d")
    lines += [zone_line(f"_mta-sts.{domain}", f"v=STSv1; id={policy_id}"),
              f"mta-sts.{domain}. IN CNAME {host}.",
              zone_line(f"_smtp._tls.{domain}", f"v=TLSRPTv1; rua=mailto:postmaster@{domain}"),
              f"; and serve https://mta-sts.{domain}/.well-known/mta-sts.txt (RFC 8461) with a valid certificate:",
              "; version: STSv1", "; mode: enforce", f"; mx: {host}", "; max_age: 604800"]
    if ctx.as_json:
        print(json.dumps({"domain": domain, "records": [line for line in lines if not line.startswith(";")]}))
    else:
        print("\n".join(lines))
    return 0


def run_guarded(command: Command) -> Command:
    def run(ctx: CommandContext, args: argparse.Namespace) -> int:
        try:
            return command(ctx, args)
        except (AdminUsageError, KeyError, OSError, ValueError) as e:
            message = str(e) if isinstance(e, AdminUsageError) else f"{type(e).__name__}: {e}"
            if ctx.as_json:
                print(json.dumps({"ok": False, "error": message}))
            else:
                print(f"mailappliance-admin: {message}", file=__import__("sys").stderr)
            return EXIT_USAGE if isinstance(e, (AdminUsageError, KeyError)) else EXIT_REFUSED
    return run


def add_parsers(groups: Subcommands) -> None:
    dkim = groups.add_parser("dkim", help="DKIM signing keys").add_subparsers(dest="action", required=True)
    keygen = dkim.add_parser("keygen", help="make a key (Ed25519 and RSA-2048 by default) and print its record")
    keygen.add_argument("domain")
    keygen.add_argument("--selector", help="selector name (default mYYYYMM + e or r)")
    keygen.add_argument("--type", choices=("ed25519", "rsa", "both"), default="both")
    keygen.add_argument("--owner", help="user to own the key file (default: the spool's owner)")
    keygen.set_defaults(run=run_guarded(cmd_dkim_keygen), needs="settings")
    dkim.add_parser("list", help="keys, and which ones sign").set_defaults(run=run_guarded(cmd_dkim_list),
                                                                          needs="settings")
    check = dkim.add_parser("check", help="look the published records up and compare them with the keys")
    check.add_argument("domain")
    check.set_defaults(run=run_guarded(cmd_dkim_check), needs="settings")
    records = groups.add_parser("dns", help="the DNS records a local domain needs (MX, SPF, DKIM, DMARC, SRV, ...)")
    records.add_argument("domain")
    records.set_defaults(run=run_guarded(cmd_dns), needs="settings")


def suspension_fields(settings: Settings, uid: str) -> dict[str, object]:
    """For ``user show``: why the subscriber's submission is suspended (empty when it is not)."""
    record = read_suspension(settings.spool_dir, uid)
    return {} if record is None else {"submission_suspended": record}


def describe_suspension(settings: Settings, uid: str) -> str | None:
    record = read_suspension(settings.spool_dir, uid)
    if record is None:
        return None
    return (f"SUSPENDED since {record.get('since', '?')}: {record.get('reason', '?')} "
            "('mailappliance-admin user enable' lifts it)")


def lift_suspension(settings: Settings, uid: str) -> bool:
    return clear_suspension(settings.spool_dir, uid)
