"""Inbound SPF, DKIM, DMARC and ARC on the MX against a DNS zone on loopback:
the Authentication-Results header, the per-domain policies, forged headers."""

from __future__ import annotations

from typing import Any, Callable

import dkim
import pytest

from tests.daemon import Appliance
from tests.dns_zone import ZoneServer, zone  # noqa: F401 (fixture)
from tests.msgauth_world import SenderKey, delivered, message, results, send
from mailappliance.smtp import replies


@pytest.fixture
def world(zone: ZoneServer) -> dict[str, Any]:  # noqa: F811
    zone.txt("pass.example", "v=spf1 ip4:127.0.0.1 -all")
    zone.txt("_dmarc.pass.example", "v=DMARC1; p=reject")
    zone.txt("fail.example", "v=spf1 -all")
    zone.txt("soft.example", "v=spf1 ~all")
    zone.servfail.add("temp.example")
    for domain, policy in (("reject.example", "reject"), ("quarantine.example", "quarantine"), ("none.example", "none")):
        zone.txt(domain, "v=spf1 -all")
        zone.txt(f"_dmarc.{domain}", f"v=DMARC1; p={policy}")
    keys = {"rsa": SenderKey("pass.example", "r1", "rsa").publish(zone),
            "ed25519": SenderKey("pass.example", "e1", "ed25519").publish(zone),
            "reject": SenderKey("reject.example", "k1", "rsa").publish(zone),
            "forwarder": SenderKey("forwarder.example", "arc", "rsa").publish(zone),
            "stranger": SenderKey("stranger.example", "arc", "rsa").publish(zone)}
    return {"zone": zone, "keys": keys}


@pytest.fixture
def mx(appliance: Callable[..., Appliance], world: dict[str, Any]) -> Appliance:
    instance = appliance(start=False, extra={
        "queue": {"resolver": world["zone"].address},
        "msgauth": {"verify": True, "dns_timeout": 3, "dmarc_quarantine": "junk",
                    "trusted_arc_sealers": ["forwarder.example"]},
        'msgauth.domains."example.net"': {"spf_fail": "reject"},
    })
    for address in ("alice@example.org", "bob@example.net"):
        assert instance.admin("user", "add", address, password="a-long-password").returncode == 0
    instance.start()
    return instance


def test_spf_pass_fail_softfail_temperror(mx: Appliance) -> None:
    """Each SPF result of the MAIL FROM domain is in our Authentication-Results; a hard fail is refused
    only where the recipient domain's policy says so (example.net), with 550 5.7.23."""
    for domain, result in (("pass.example", "pass"), ("fail.example", "fail"), ("soft.example", "softfail"),
                           ("temp.example", "temperror")):
        assert send(mx, f"someone@{domain}", message(f"someone@{domain}"))[0] == 250
    mails = delivered(mx, count=4)
    for msg, (domain, result) in zip(mails, (("pass.example", "pass"), ("fail.example", "fail"),
                                             ("soft.example", "softfail"), ("temp.example", "temperror"))):
        assert f"spf={result}" in results(msg) and f"smtp.mailfrom={domain}" in results(msg)
    code, text = send(mx, "someone@fail.example", message("someone@fail.example"), rcpts=("bob@example.net",))
    assert (code, text) == (550, f"{replies.SPF_REJECTED.status} {replies.SPF_REJECTED.text}")


def test_dkim_rsa_ed25519_pass_and_body_modified_in_transit(mx: Appliance, world: dict[str, Any]) -> None:
    """RSA and Ed25519 signatures (and both at once) verify; a body changed after signing fails DKIM,
    and then DMARC p=reject (no aligned SPF either) refuses the message with 550 5.7.1."""
    keys = world["keys"]
    base = message("news@pass.example", "signed")
    for signed in (keys["rsa"].sign(base), keys["ed25519"].sign(base), keys["rsa"].sign(keys["ed25519"].sign(base))):
        assert send(mx, "bounce@fail.example", signed)[0] == 250
    rsa_only, ed_only, both = (results(m) for m in delivered(mx, count=3))
    assert "dkim=pass header.d=pass.example header.s=r1 header.a=rsa-sha256" in rsa_only
    assert "dkim=pass header.d=pass.example header.s=e1 header.a=ed25519-sha256" in ed_only
    assert both.count("dkim=pass") == 2 and "dmarc=pass" in both and "spf=fail" in both
    tampered = keys["rsa"].sign(base).replace(b"Hello there.", b"Hello there!")
    code, text = send(mx, "bounce@fail.example", tampered)
    assert (code, text) == (550, f"{replies.DMARC_REJECTED.status} {replies.DMARC_REJECTED.text}")
    assert len(delivered(mx, count=3)) == 3


def test_dmarc_reject_quarantine_none(mx: Appliance) -> None:
    """p=reject: 550 5.7.1 and nothing delivered; p=quarantine: into .Junk with X-Spam-Flag (policy
    "junk"); p=none: delivered to the inbox, the header tells."""
    code, text = send(mx, "x@reject.example", message("x@reject.example"))
    assert (code, text) == (550, f"{replies.DMARC_REJECTED.status} {replies.DMARC_REJECTED.text}")
    assert send(mx, "x@quarantine.example", message("x@quarantine.example"))[0] == 250
    junk = delivered(mx, folder=".Junk")[0]
    assert "dmarc=fail (p=quarantine dis=quarantine) header.from=quarantine.example" in results(junk)
    assert junk["X-Spam-Flag"] == "YES"
    assert (mx.maildir_root / "alice" / ".Junk" / "maildirfolder").exists()
    assert send(mx, "x@none.example", message("x@none.example"))[0] == 250
    inbox = delivered(mx)
    assert len(inbox) == 1 and "dmarc=fail (p=none dis=none) header.from=none.example" in results(inbox[0])
    assert inbox[0]["X-Spam-Flag"] is None


def test_forged_authentication_results_removed(mx: Appliance) -> None:
    """Authentication-Results claiming our hostname (any case, comments, quotes, a trailing dot) are
    removed; another server's are kept; ours is the only one with our authserv-id."""
    forged = (b"Authentication-Results: mx.test.example; dkim=pass header.d=bank.example\r\n"
              b"Authentication-Results: (hi) MX.TEST.EXAMPLE. 1; spf=pass\r\n"
              b"Authentication-Results: \"mx.test.example\";\r\n dmarc=pass\r\n"
              b"Authentication-Results: upstream.example; spf=pass smtp.mailfrom=bank.example\r\n")
    assert send(mx, "x@fail.example", message("bank@fail.example", extra=forged))[0] == 250
    msg = delivered(mx)[0]
    values = msg.get_all("Authentication-Results")
    assert len(values) == 2
    assert "dkim=pass" not in results(msg) and "spf=fail" in results(msg)
    assert any(v.strip().startswith("upstream.example") for v in values)


def _forwarded(world: dict[str, Any], sealer: str) -> bytes:
    """reject.example's signed mail, changed by a list (footer) and ARC-sealed by ``sealer``."""
    keys = world["keys"]
    original = keys["reject"].sign(message("ceo@reject.example", "via the list"))
    changed = original.replace(b"Hello there.\r\n", b"Hello there.\r\n-- \r\nlist footer\r\n")
    changed = f"Authentication-Results: {sealer}; dkim=pass header.d=reject.example\r\n".encode() + changed
    key = keys["forwarder" if sealer == "forwarder.example" else "stranger"]
    seal = dkim.arc_sign(changed, b"arc", sealer.encode(), key.private, sealer.encode())
    return b"".join(seal) + changed


def test_arc_chain_from_a_trusted_sealer_lifts_dmarc_reject(mx: Appliance, world: dict[str, Any]) -> None:
    """A forwarder broke the DKIM signature but sealed a valid ARC chain: arc=pass; sealed by a trusted
    forwarder the message is delivered, by any other sealer DMARC p=reject still refuses it."""
    assert send(mx, "list@forwarder.example", _forwarded(world, "forwarder.example"))[0] == 250
    ar = results(delivered(mx)[0])
    assert "arc=pass" in ar and "dkim=fail" in ar and "dmarc=fail" in ar
    code, _ = send(mx, "list@stranger.example", _forwarded(world, "stranger.example"))
    assert code == 550
