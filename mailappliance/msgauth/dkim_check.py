"""DKIM (RFC 6376, RFC 8463 Ed25519) with dkimpy: verifying every signature of a
message (up to a bound), ARC chain validation (RFC 8617), and signing.

dkimpy gets a ``dnsfunc`` that reads the message's
:class:`~mailappliance.msgauth.dns.DnsView` (never the system resolver).
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import dkim

from mailappliance.msgauth import speedups
from mailappliance.msgauth.dns import DnsTempError, DnsView, _key
from mailappliance.msgauth.headers import Field
from mailappliance.msgauth.keys import SigningKey

speedups.install()

MAX_SIGNATURES = 5  # verified per message; more are reported as not checked (policy)
MAX_SIGNATURE_FIELD = 8192  # octets of one DKIM-Signature field; longer ones are a permerror
MIN_KEY_BITS = 1024  # RFC 8301: verifiers must refuse RSA keys below 1024 bits
OVERSIGNED = (b"from", b"to", b"subject", b"date")  # signed once more than present: none can be added


@attrs.frozen
class DkimResult:
    result: str  # pass fail neutral temperror permerror policy
    domain: str = ""
    selector: str = ""
    algorithm: str = ""
    header_b: str = ""  # the first characters of b= (RFC 6008), to tell signatures apart
    reason: str = ""


def _ascii(value: object) -> str:
    return value.decode("ascii", "replace") if isinstance(value, bytes) else str(value or "")


def make_dnsfunc(view: DnsView) -> Callable[..., bytes | None]:
    """dkimpy's ``dnsfunc``: the key record at ``name`` or None."""

    def dnsfunc(name: bytes | str, timeout: float = 5) -> bytes | None:
        try:
            records = view.txt(_ascii(name))
        except DnsTempError as e:
            raise dkim.DnsTimeoutError(str(e)) from None
        found = [r for r in records if b"p=" in r] or records
        return found[0] if found else None

    return dnsfunc


class DkimVerifier:
    """Verifies a message's DKIM signatures; ``__call__(view)`` can be repeated after
    cache misses and does only what is still missing."""

    def __init__(self, message: bytes, signature_sizes: list[int]) -> None:
        self.message = message
        self.sizes = signature_sizes  # raw size of each DKIM-Signature field, top to bottom
        self._parsed: dkim.DKIM | None = None
        self.results: dict[int, DkimResult] = {}

    def __call__(self, view: DnsView) -> list[DkimResult]:
        parsed = self._parsed
        if parsed is None:
            parsed = self._parsed = dkim.DKIM(self.message, minkey=MIN_KEY_BITS)
        for index, size in enumerate(self.sizes[:MAX_SIGNATURES]):
            if index in self.results:
                continue
            if size > MAX_SIGNATURE_FIELD:
                self.results[index] = DkimResult("permerror", reason="signature field too long")
            else:
                self.results[index] = self._verify(parsed, index, view)
        found = [self.results[i] for i in range(min(len(self.sizes), MAX_SIGNATURES))]
        if len(self.sizes) > MAX_SIGNATURES:
            found.append(DkimResult("policy", reason=f"{len(self.sizes) - MAX_SIGNATURES} more signatures not checked"))
        return found

    def _verify(self, d: dkim.DKIM, index: int, view: DnsView) -> DkimResult:
        d.signature_fields = {}
        broken = False  # the signature cannot be evaluated at all (RFC 8601: permerror)
        try:
            ok = d.verify(idx=index, dnsfunc=make_dnsfunc(view))
            reason = "" if ok else "signature did not verify"
        except dkim.ValidationError as e:
            ok, reason = False, str(e)
            broken = "body hash mismatch" not in reason
        except dkim.DKIMException as e:
            ok, reason, broken = False, str(e), True
        except Exception as e:  # dkimpy on input it did not expect: the signature is broken, not us
            ok, reason, broken = False, f"unreadable signature: {type(e).__name__}", True
        fields = d.signature_fields or {}
        domain, selector = _ascii(fields.get(b"d")).lower(), _ascii(fields.get(b"s"))
        common = dict(domain=domain, selector=selector, algorithm=_ascii(fields.get(b"a")),
                      header_b=_ascii(fields.get(b"b", b""))[:8].replace(" ", ""))
        if ok:
            return DkimResult("pass", **common)
        key_name = _key(f"{selector}._domainkey.{domain}", "TXT")
        if key_name in view.failed:
            return DkimResult("temperror", reason="key lookup failed", **common)
        if broken or not fields:
            return DkimResult("permerror", reason=reason[:200], **common)
        return DkimResult("fail", reason=reason[:200], **common)


@attrs.frozen
class ArcResult:
    result: str  # pass fail none
    sealer: str = ""  # d= of the newest ARC-Seal
    instances: int = 0
    reason: str = ""


class ArcVerifier:
    """ARC chain validation (RFC 8617 5.2); repeatable like :class:`DkimVerifier`."""

    def __init__(self, message: bytes) -> None:
        self.message = message

    def __call__(self, view: DnsView) -> ArcResult:
        try:
            cv, data, reason = dkim.ARC(self.message, minkey=MIN_KEY_BITS).verify(dnsfunc=make_dnsfunc(view))
        except dkim.DKIMException as e:
            return ArcResult("fail", reason=str(e)[:200])
        except Exception as e:
            return ArcResult("fail", reason=f"unreadable ARC set: {type(e).__name__}")
        sealer = _ascii(data[0].get("as-domain")).lower() if data else ""
        result = {dkim.CV_Pass: "pass", dkim.CV_None: "none"}.get(cv, "fail")
        return ArcResult(result, sealer, len(data), "" if result == "pass" else _ascii(reason)[:200])


def signing_headers(fields: list[Field]) -> list[bytes]:
    """RFC 6376 5.4's recommended fields that the message has, plus From, To,
    Subject and Date once more (oversigning: none of them can be added later)."""
    present = [field.name.encode("ascii") for field in fields if field.name.encode("ascii") in dkim.DKIM.SHOULD]
    return present + list(OVERSIGNED)


def sign(message: bytes, keys: list[SigningKey], include: list[bytes]) -> list[bytes]:
    """DKIM-Signature fields (CRLF-terminated) for ``message``, one per key, relaxed/relaxed."""
    signatures = []
    for key in keys:
        signer = dkim.DKIM(message, linesep=b"\r\n")
        header = signer.sign(key.selector.encode(), key.domain.encode(), key.private,
                             signature_algorithm=key.algorithm.encode(), canonicalize=(b"relaxed", b"relaxed"),
                             include_headers=include)
        signatures.append(header if header.endswith(b"\r\n") else header + b"\r\n")
    return signatures
