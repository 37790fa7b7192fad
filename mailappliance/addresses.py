"""Validation of addresses, domains and uids for the admin side and the config.

SMTP paths are parsed separately (mailappliance.mailpath) because the relay
decision needs to see every odd form; here we only accept the plain forms a
subscriber entry may hold.
"""

from __future__ import annotations

import re
import unicodedata

import idna

from mailappliance.directory import InvalidAddress
from mailappliance.mailpath import PathSyntaxError, parse_path

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_LOCAL_PART = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*")
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_UID = re.compile(r"[A-Za-z0-9_@+][A-Za-z0-9._@+-]{0,63}")
_ROUTING = set("%!")
MAX_DISPLAY_NAME = 128
MAX_MAILBOX_NAME_BYTES = 255  # NAME_MAX of Linux filesystems


def normalize_domain(text: str) -> str:
    """A lower-case domain of LDH labels (no trailing dot); InvalidAddress otherwise.
    An internationalised domain (U-labels) becomes its A-labels (IDNA 2008), the
    form DNS and the SMTP side use."""
    domain = text.strip().lower()
    if not domain.isascii():
        try:
            domain = idna.encode(unicodedata.normalize("NFC", domain)).decode("ascii")
        except (idna.IDNAError, UnicodeError, ValueError):
            raise InvalidAddress(f"{text!r} is not a valid internationalised domain name") from None
    if not domain or len(domain) > 253:
        raise InvalidAddress(f"{text!r} is not a domain name")
    if not all(_LABEL.fullmatch(label) for label in domain.split(".")):
        raise InvalidAddress(f"{text!r} is not a domain name (letters, digits, '-', dots between labels)")
    return domain


def normalize_address(text: str) -> str:
    """``local@domain`` lower-cased; InvalidAddress with the reason otherwise.

    '%' and '!' are refused even though RFC 5322 allows them: they are
    routing characters that relay probes use, and no subscriber needs them.
    """
    address = text.strip()
    if address.count("@") != 1:
        raise InvalidAddress(f"{text!r} is not an address (expected exactly one '@')")
    local, domain = address.split("@")
    if not local.isascii():  # SMTPUTF8 (RFC 6531): stored in UTF-8, NFC, as the SMTP side compares it
        local = unicodedata.normalize("NFC", local)
        try:
            parsed = parse_path(f"<{local}@example.invalid>", allow_null=False, utf8=True)
        except PathSyntaxError:
            parsed = None
        if parsed is None or parsed.quoted or _ROUTING & set(local):
            raise InvalidAddress(f"{text!r}: the part before '@' is not a valid local part")
        return f"{local.lower()}@{normalize_domain(domain)}"
    if not local or len(local) > 64 or not _LOCAL_PART.fullmatch(local) or _ROUTING & set(local):
        raise InvalidAddress(f"{text!r}: the part before '@' is not a valid local part")
    return f"{local.lower()}@{normalize_domain(domain)}"


def is_safe_mailbox_name(uid: str) -> bool:
    """True if ``uid`` can name a Maildir directly under ``maildir_root``.

    One path component that is not hidden: non-empty, no '/', no leading '.',
    no '..', no NUL or other control character, at most 255 bytes.  The
    directory may hold entries made with other tools than ours, so this is
    checked again wherever a uid becomes a path (RCPT, POP3 login), not only
    when an admin adds a subscriber.
    """
    if not uid or "/" in uid or uid.startswith(".") or ".." in uid:
        return False
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in uid):
        return False
    return len(uid.encode("utf-8", "surrogatepass")) <= MAX_MAILBOX_NAME_BYTES


def validate_uid(text: str) -> str:
    """A login name that is also a safe Maildir directory name."""
    if not _UID.fullmatch(text) or not is_safe_mailbox_name(text):
        raise InvalidAddress(
            f"{text!r} is not a valid uid (1-64 of letters, digits, '.', '_', '@', '+', '-'; "
            "not starting with '.' or '-', no '..')"
        )
    return text


def validate_display_name(text: str) -> str:
    """A display name (``cn``) an admin may set: printable, at most 128 characters.

    Refuses control characters and line or paragraph separators outright, so a
    name can never carry a line break into the directory file or a log line.
    """
    name = text.strip()
    if len(name) > MAX_DISPLAY_NAME:
        raise InvalidAddress(f"a display name has at most {MAX_DISPLAY_NAME} characters, got {len(name)}")
    if not name.isprintable():
        bad = next(ch for ch in name if not ch.isprintable())
        raise InvalidAddress(f"the display name contains the unprintable character U+{ord(bad):04X}")
    return name


def validate_new_subscriber(uid: str, mail: str, display_name: str) -> tuple[str, str, str]:
    """The checked forms of a new subscriber's uid, address and display name (every store)."""
    return validate_uid(uid), normalize_address(mail), validate_display_name(display_name)
