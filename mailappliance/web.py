"""The HTTP side: client autoconfiguration, metrics and health (twisted.web).

- role ``autoconfig`` (HTTP) / ``autoconfigs`` (HTTPS): Mozilla autoconfig
  (``/.well-known/autoconfig/mail/config-v1.1.xml``, ``/mail/config-v1.1.xml``)
  and Microsoft autodiscover POX (``/autodiscover/autodiscover.xml``), both
  generated from the live listener configuration, so clients are told exactly
  what the daemon offers. Paths match case-insensitively (Outlook asks for
  ``/Autodiscover/Autodiscover.xml``).
- role ``metrics`` (bind it to loopback): ``/metrics`` (Prometheus text) and
  ``/health`` (is the directory answering, is the spool writable).

Both are :class:`~mailappliance.web_limits.LimitedSite`: connection caps,
header and body deadlines, and a body limit enforced while reading.
"""

from __future__ import annotations

import json
import os
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Awaitable, Callable
from pathlib import Path
from xml.sax.saxutils import escape

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.web import resource, server

from mailappliance.addresses import normalize_address
from mailappliance.config import Settings
from mailappliance.directory import InvalidAddress
from mailappliance.metrics import METRICS
from mailappliance.web_limits import MAX_REQUEST_BODY, HttpLimits, LimitedSite

AUTODISCOVER_RESPONSE = "http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a"


@attrs.frozen
class Offer:
    """One way in, as a mail client must be told: protocol, port, socket type."""

    protocol: str  # "pop3" or "smtp"
    port: int
    socket_type: str  # "SSL" (implicit TLS) or "STARTTLS"


def offers(settings: Settings) -> list[Offer]:
    """What the listeners offer to subscribers, best first (implicit TLS before STARTTLS)."""
    table = {"pop3s": ("pop3", "SSL"), "pop3": ("pop3", "STARTTLS"),
             "submissions": ("smtp", "SSL"), "submission": ("smtp", "STARTTLS")}
    found = [Offer(table[listener.role][0], listener.port, table[listener.role][1])
             for listener in settings.listeners if listener.role in table]
    # one port on several addresses (127.0.0.1 and ::1, an IPv4 and an IPv6 address) is one offer
    return sorted(dict.fromkeys(found), key=lambda o: (o.protocol, o.socket_type != "SSL"))


def autoconfig_xml(settings: Settings, domain: str) -> bytes:
    host = escape(settings.hostname)
    certificates = settings.tls.client_ca is not None
    servers = []
    for offer in offers(settings):
        element = "incomingServer" if offer.protocol == "pop3" else "outgoingServer"
        auth = "      <authentication>password-cleartext</authentication>\n"
        if certificates and offer.protocol == "smtp":
            auth += "      <authentication>TLS-client-cert</authentication>\n"
        servers.append(
            f'    <{element} type="{offer.protocol}">\n'
            f"      <hostname>{host}</hostname>\n"
            f"      <port>{offer.port}</port>\n"
            f"      <socketType>{offer.socket_type}</socketType>\n"
            f"{auth}"
            f"      <username>%EMAILADDRESS%</username>\n"
            f"    </{element}>\n"
        )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<clientConfig version="1.1">\n'
        f'  <emailProvider id="{escape(domain)}">\n'
        f"    <domain>{escape(domain)}</domain>\n"
        f"    <displayName>{escape(domain)} mail</displayName>\n"
        f"    <displayShortName>{escape(domain)}</displayShortName>\n"
        + "".join(servers)
        + "  </emailProvider>\n</clientConfig>\n"
    ).encode()


def autodiscover_xml(settings: Settings, address: str) -> bytes:
    seen: set[str] = set()
    protocols = []
    for offer in offers(settings):
        kind = "POP3" if offer.protocol == "pop3" else "SMTP"
        if kind in seen:  # Outlook takes one entry per type: the best one
            continue
        seen.add(kind)
        encryption = "SSL" if offer.socket_type == "SSL" else "TLS"
        protocols.append(
            "      <Protocol>\n"
            f"        <Type>{kind}</Type>\n"
            f"        <Server>{escape(settings.hostname)}</Server>\n"
            f"        <Port>{offer.port}</Port>\n"
            f"        <LoginName>{escape(address)}</LoginName>\n"
            "        <DomainRequired>off</DomainRequired>\n"
            "        <SPA>off</SPA>\n"
            f"        <SSL>on</SSL>\n"
            f"        <Encryption>{encryption}</Encryption>\n"
            "        <AuthRequired>on</AuthRequired>\n"
            "      </Protocol>\n"
        )
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        '<Autodiscover xmlns="http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006">\n'
        f'  <Response xmlns="{AUTODISCOVER_RESPONSE}">\n'
        "    <Account>\n      <AccountType>email</AccountType>\n      <Action>settings</Action>\n"
        + "".join(protocols)
        + "    </Account>\n  </Response>\n</Autodiscover>\n"
    ).encode()


class _Leaf(resource.Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # Resource is unannotated


class AutoconfigResource(_Leaf):
    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.settings = settings

    def render_GET(self, request: server.Request) -> bytes:
        address = (request.args.get(b"emailaddress") or [b""])[0].decode("utf-8", "replace")
        host = (request.getRequestHostname() or b"").decode("ascii", "replace").lower()
        domain = ""
        if address:
            try:
                domain = normalize_address(address).rsplit("@", 1)[1]
            except InvalidAddress:
                request.setResponseCode(400)
                return b"bad emailaddress\n"
        elif host.startswith("autoconfig."):
            domain = host[len("autoconfig."):]
        domain = domain or self.settings.local_domains[0]
        if domain not in self.settings.local_domains:
            request.setResponseCode(404)
            return b"not a domain served here\n"
        request.setHeader(b"content-type", b"application/xml; charset=utf-8")
        return autoconfig_xml(self.settings, domain)


class AutodiscoverResource(_Leaf):
    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.settings = settings

    def render_POST(self, request: server.Request) -> bytes:
        assert request.content is not None  # the body (empty when none was sent)
        body = request.content.read(MAX_REQUEST_BODY + 1)
        if len(body) > MAX_REQUEST_BODY:
            request.setResponseCode(413)
            return b"request too large\n"
        try:
            root = ElementTree.fromstring(body)
            address = next(e.text for e in root.iter() if e.tag.endswith("EMailAddress") and e.text)
            address = normalize_address(address)
        except (ElementTree.ParseError, StopIteration, InvalidAddress):
            request.setResponseCode(400)
            return b"expected an autodiscover request with an EMailAddress\n"
        if address.rsplit("@", 1)[1] not in self.settings.local_domains:
            request.setResponseCode(404)
            return b"not a domain served here\n"
        request.setHeader(b"content-type", b"application/xml; charset=utf-8")
        return autodiscover_xml(self.settings, address)

    render_GET = render_POST  # some clients GET it; they still must send a body to be answered


class MetricsResource(_Leaf):
    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
        return METRICS.render().encode()


class HealthResource(_Leaf):
    """200 when the directory answers and the spool is writable; 503 with the reasons otherwise.
    ``state_store`` says whether limits and locks are shared ("ok"), per process while
    Redis is away ("degraded"), or per process by configuration ("memory")."""

    def __init__(self, check_directory: Callable[[], Awaitable[object]], check_spool: Callable[[], Awaitable[object]],
                 current_server: Callable[[], str] = lambda: "",
                 state_store: Callable[[], str] = lambda: "memory") -> None:
        super().__init__()
        self.check_directory = check_directory
        self.check_spool = check_spool
        self.current_server = current_server  # the LDAP server lookups go to ("" for LDIF)
        self.state_store = state_store  # "memory", "ok" (shared in Redis) or "degraded" (per process)

    def render_GET(self, request: server.Request) -> int:
        Deferred.fromCoroutine(self._report(request))
        return server.NOT_DONE_YET

    async def _report(self, request: server.Request) -> None:
        status: dict[str, str] = {}
        for name, check in (("directory", self.check_directory), ("spool", self.check_spool)):
            try:
                await check()
                status[name] = "ok"
            except Exception as e:
                status[name] = f"error: {e}"
        healthy = all(v == "ok" for v in status.values())
        status["directory_server"] = self.current_server() or "none"  # a fact, not a check
        status["state_store"] = self.state_store()  # degraded is not down: it does not make us unhealthy
        request.setResponseCode(200 if healthy else 503)
        request.setHeader(b"content-type", b"application/json")
        request.write(json.dumps({"healthy": healthy, **status}).encode() + b"\n")
        request.finish()


def spool_probe(spool_dir: Path) -> None:
    """Blocking: can we create, fsync and remove a file where messages are stored?"""
    probe = spool_dir / f".health-{os.getpid()}-{time.monotonic_ns()}"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, b"ok")
        os.fsync(fd)
    finally:
        os.close(fd)
        os.unlink(probe)


def autoconfig_site(settings: Settings, limits: HttpLimits | None = None, clock: IReactorTime | None = None,
                    name: str = "autoconfig") -> LimitedSite:
    """Autoconfig and autodiscover for one listener; ``clock`` defaults to the reactor."""
    root = _Folder()
    autoconfig = AutoconfigResource(settings)
    well_known = _Folder()
    mail = _Folder()
    root.putChild(b".well-known", well_known)
    well_known.putChild(b"autoconfig", _child(b"mail", _child(b"config-v1.1.xml", autoconfig)))
    root.putChild(b"mail", mail)
    mail.putChild(b"config-v1.1.xml", autoconfig)
    root.putChild(b"autodiscover", _child(b"autodiscover.xml", AutodiscoverResource(settings)))
    return LimitedSite(root, limits, clock, name)


def metrics_site(health: HealthResource, limits: HttpLimits | None = None, clock: IReactorTime | None = None,
                 name: str = "metrics") -> LimitedSite:
    """Metrics and health for one listener; ``clock`` defaults to the reactor."""
    root = resource.Resource()
    root.putChild(b"metrics", MetricsResource())
    root.putChild(b"health", health)
    return LimitedSite(root, limits, clock, name)


class _Folder(resource.Resource):
    """A folder whose children's names match in any case (register them in lower case):
    clients spell ``/Autodiscover/Autodiscover.xml`` as they please."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # Resource is unannotated

    def getChildWithDefault(self, path: bytes, request: server.Request) -> resource.IResource:
        child: resource.IResource = super().getChildWithDefault(  # type: ignore[no-untyped-call]  # unannotated
            path.lower(), request)
        return child


def _child(name: bytes, child: resource.IResource) -> resource.IResource:
    parent = _Folder()
    parent.putChild(name, child)
    return parent
