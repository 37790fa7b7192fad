"""Where a local recipient goes (alias domains, sub-addresses, role accounts, catch-alls,
forwarding, SRS) and which senders a subscriber may use: pure functions, no sockets."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailappliance.addressing import (
    Addressing,
    Lookup,
    SrsRefusal,
    SrsReturn,
    folder_for_tag,
    forwarding_sender,
    plan_recipient,
    resolve,
)
from mailappliance.directory import Subscriber
from mailappliance.folders import FolderTarget, delivery_target, filing_path
from mailappliance.policy import decide_sender
from mailappliance.mailpath import parse_path
from mailappliance.srs import Srs, SrsKeys

NOW = 1_700_000_000.0
SRS = Srs(SrsKeys(b"0123456789abcdef0123456789abcdef"), "example.net")
FACTS = Addressing(
    local_domains=frozenset({"example.net", "example.com"}),
    alias_domains={"example.org": "example.net"},
    delimiter="+",
    catch_all={"example.com": "info@example.com"},
    postmaster="hostmaster@example.net",
    srs=SRS,
    first_domain="example.net",
)
ALICE = Subscriber(dn="uid=alice,ou=people,dc=example,dc=org", uid="alice", mail="alice@example.net",
                   aliases=("a.liddell@example.net",))


def plan(address: str, facts: Addressing = FACTS) -> object:
    return plan_recipient(facts, parse_path(f"<{address}>", allow_null=False), NOW)


def test_alias_domain_is_looked_up_in_its_local_domain() -> None:
    """user@alias-domain is asked for as user@local-domain."""
    assert plan("Alice@Example.ORG") == (Lookup("alice@example.net", "address"),)
    assert FACTS.accepted_domains == {"example.net", "example.com", "example.org"}


def test_sub_address_tries_the_full_address_first() -> None:
    """alice+lists@ is looked up as itself, then as alice@ with the tag kept for filing."""
    assert plan("alice+lists@example.org") == (Lookup("alice+lists@example.net", "address"),
                                               Lookup("alice@example.net", "subaddress", "lists"))
    off = Addressing(local_domains=frozenset({"example.net"}))
    assert plan("alice+lists@example.net", off) == (Lookup("alice+lists@example.net", "address"),)
    assert plan("+lists@example.net") == (Lookup("+lists@example.net", "address"),)


@pytest.mark.parametrize("address, fallback", [
    ("postmaster@example.com", "hostmaster@example.net"),
    ("Abuse@example.org", "hostmaster@example.net"),
    ("postmaster+x@example.net", "hostmaster@example.net"),
])
def test_role_accounts_fall_back_to_the_configured_mailbox(address: str, fallback: str) -> None:
    """postmaster@ and abuse@ of every domain end at the configured mailbox if no entry names them."""
    lookups = plan(address)
    assert isinstance(lookups, tuple) and lookups[-1] == Lookup(fallback, "postmaster")
    assert FACTS.is_role_account(parse_path(f"<{address}>", allow_null=False))


def test_role_mailbox_defaults() -> None:
    """Without settings postmaster@ goes to postmaster@<first domain>; abuse@ follows postmaster."""
    facts = Addressing(local_domains=frozenset({"b.example", "a.example"}), first_domain="b.example")
    assert facts.role_mailbox("postmaster") == "postmaster@b.example"
    assert facts.role_mailbox("abuse") == "postmaster@b.example"
    assert not facts.is_role_account(parse_path("<postmaster@remote.example>", allow_null=False))
    assert facts.is_role_account(parse_path("<postmaster>", allow_null=False))


def test_catch_all_only_where_configured() -> None:
    """A domain's catch-all is the last lookup; other domains have none."""
    assert plan("nobody@example.com")[-1] == Lookup("info@example.com", "catch-all")  # type: ignore[index]
    assert plan("nobody@example.net") == (Lookup("nobody@example.net", "address"),)


def test_srs_addresses_are_reversed_or_refused() -> None:
    """A valid SRS0 address returns to its sender; a forged one is refused, never looked up."""
    srs = SRS.forward("eve@sender.example", NOW)
    at_alias = srs.replace("example.net", "example.org")  # type: ignore[union-attr]
    assert plan(at_alias) == SrsReturn("eve@sender.example")
    assert isinstance(plan("SRS0=AAAAAAAA=AA=victim.example=x@example.net"), SrsRefusal)
    no_key = Addressing(local_domains=frozenset({"example.net"}))
    assert isinstance(plan(srs, no_key), SrsRefusal)  # type: ignore[arg-type]


@pytest.mark.parametrize("tag, folder", [
    ("lists", ".lists"), ("Lists.Work", ".Lists.Work"), (".hidden", ""), ("a/b", ""), ("..", ""),
    ("x" * 65, ""), ("", ""), ("tab\there", ""),
])
def test_folder_names_from_tags(tag: str, folder: str) -> None:
    """A tag names a Maildir++ folder only if it is one safe path component."""
    assert folder_for_tag(tag) == folder


def test_resolution_of_forwarding() -> None:
    """Remote targets are forwarded, local ones delivered, the own address keeps a copy; junk is ignored."""
    forwarding = Subscriber(dn="uid=bob", uid="bob", mail="bob@example.net", forwards=(
        "bob@remote.example", "<carol@example.org>", "bob@EXAMPLE.org", "bob%evil@example.net",
        "not an address", "x@[127.0.0.1]", "SRS0=x=y=z=w@example.net", "bob@remote.example"))
    r = resolve(FACTS, Lookup("bob@example.net", "address"), forwarding, "bob@example.org")
    assert r.forward_remote == ("bob@remote.example",)
    assert r.forward_local == ("carol@example.net",)
    assert r.deliver_locally  # bob@example.org is bob's own address (alias domain form)
    assert len(r.ignored_forwards) == 4
    only_out = Subscriber(dn="uid=d", uid="d", mail="d@example.net", forwards=("d@remote.example",))
    assert not resolve(FACTS, Lookup("d@example.net", "address"), only_out, "d@example.net").deliver_locally
    junk = Subscriber(dn="uid=e", uid="e", mail="e@example.net", forwards=("junk",))
    assert resolve(FACTS, Lookup("e@example.net", "address"), junk, "e@example.net").deliver_locally
    many = Subscriber(dn="uid=f", uid="f", mail="f@example.net", forwards=tuple(f"f{i}@r.example" for i in range(40)))
    assert len(resolve(FACTS, Lookup("f@example.net", "address"), many, "f@example.net").forward_remote) == 16


def test_subaddress_resolution_names_the_folder() -> None:
    """Found by way of its sub-address, a recipient is filed into that folder (if it exists)."""
    r = resolve(FACTS, Lookup("alice@example.net", "subaddress", "lists"), ALICE, "alice+lists@example.net")
    assert (r.folder, r.received_as, r.deliver_locally) == (".lists", "alice+lists@example.net", True)


def test_forwarding_sender() -> None:
    """Forwarded copies get an SRS sender unless the sender is null or already ours."""
    rewritten = forwarding_sender(FACTS, "eve@sender.example", NOW)
    assert rewritten.startswith("SRS0=") and rewritten.endswith("@example.net")
    assert forwarding_sender(FACTS, "", NOW) == ""
    assert forwarding_sender(FACTS, "bob@example.org", NOW) == "bob@example.org"


@pytest.mark.parametrize("sender, allowed", [
    ("alice@example.net", True), ("alice@example.org", True), ("A.Liddell@Example.org", True),
    ("alice+news@example.org", True), ("alice@example.com", False), ("alicex@example.org", False),
    ("bob@example.org", False),
])
def test_subscriber_may_send_as_alias_domain_forms(sender: str, allowed: bool) -> None:
    """A subscriber may send as their addresses in any alias-domain form and with a sub-address."""
    why = decide_sender(parse_path(f"<{sender}>", allow_null=True), ALICE, FACTS)
    assert (why is None) is allowed


def test_folder_target_files_only_into_existing_folders(tmp_path: Path) -> None:
    """A +tag folder is used if it exists (any case), never created, never through a symlink."""
    mailbox = tmp_path / "alice"
    (mailbox / ".Lists" / "new").mkdir(parents=True)
    assert filing_path(delivery_target(mailbox, ".lists")) == mailbox / ".Lists"
    assert filing_path(delivery_target(mailbox, ".Lists")) == mailbox / ".Lists"
    assert filing_path(delivery_target(mailbox, ".other")) == mailbox
    assert not (mailbox / ".other").exists()
    (tmp_path / "elsewhere" / "new").mkdir(parents=True)
    (mailbox / ".link").symlink_to(tmp_path / "elsewhere")
    assert filing_path(FolderTarget(mailbox, ".link")) == mailbox
    assert delivery_target(mailbox) == mailbox
