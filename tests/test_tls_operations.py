"""TLS as an admin runs it: generated certificate, protocol floor, SIGHUP reload, issuing
client certificates - against the real daemon."""

from __future__ import annotations

import re
import signal
import smtplib
import ssl
import subprocess
from pathlib import Path
from typing import Any, Callable

import pytest

from mailappliance.tls import fingerprint
from tests.conditions import wait_until
from tests.daemon import Appliance


def test_first_start_generates_a_certificate_and_logs_its_fingerprint(
    appliance: Callable[..., Appliance],
) -> None:
    """A first start generates a self-signed certificate (key 0600), logs its fingerprint, and keeps it on restart."""
    instance = appliance()
    certificate = instance.root / "tls" / "server.pem"
    key = instance.root / "tls" / "server.key"
    assert certificate.exists() and key.stat().st_mode & 0o777 == 0o600
    openssl = subprocess.run(["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in", str(certificate)],
                             capture_output=True, text=True, check=True).stdout
    assert openssl.strip().endswith(fingerprint(certificate))
    assert f"SHA-256 fingerprint {fingerprint(certificate)}" in instance.log()
    with smtplib.SMTP("127.0.0.1", instance.ports["submission"], timeout=10) as smtp:
        smtp.starttls(context=instance.client_context())  # trusts exactly the generated certificate
        assert smtp.noop()[0] == 250
    instance.stop()
    instance.start()  # a second start keeps the same certificate
    assert f"SHA-256 fingerprint {fingerprint(certificate)}" in instance.log()
    assert instance.log().count("generated a self-signed certificate") == 1


@pytest.mark.parametrize("version, accepted", [
    (ssl.TLSVersion.TLSv1_1, False), (ssl.TLSVersion.TLSv1_2, True), (ssl.TLSVersion.TLSv1_3, True)])
def test_tls_1_2_is_the_floor(appliance: Callable[..., Appliance], pki: Any, version: ssl.TLSVersion,
                              accepted: bool) -> None:
    """A client limited to TLS 1.1 is refused; TLS 1.2 and 1.3 connect."""
    instance = appliance(pki=pki)
    context = pki.client_context()
    context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    context.maximum_version = version
    context.set_ciphers("ALL:@SECLEVEL=0")  # let the client offer old versions; the server must say no
    if accepted:
        with smtplib.SMTP_SSL("127.0.0.1", instance.ports["submissions"], timeout=10, context=context) as smtp:
            assert smtp.sock.version() == version.name.replace("_", ".")  # e.g. TLSv1.2
    else:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            smtplib.SMTP_SSL("127.0.0.1", instance.ports["submissions"], timeout=10, context=context)


def test_sighup_reloads_the_certificate_without_dropping_sessions(
    appliance: Callable[..., Appliance], pki: Any, tmp_path: Path,
) -> None:
    """SIGHUP serves a new certificate to new sessions, keeps open ones; a broken file keeps the old one."""
    certificate = tmp_path / "server.pem"
    certificate.write_bytes(pki.server_cert.read_bytes())
    instance = appliance(pki=pki, extra={"tls": {"certificate": str(certificate)}})
    old_session = smtplib.SMTP("127.0.0.1", instance.ports["submission"], timeout=10)
    old_session.starttls(context=pki.client_context())
    first = old_session.sock.getpeercert(binary_form=True)

    new_der = pki.reissue_server_certificate(certificate)
    assert instance.process is not None
    instance.process.send_signal(signal.SIGHUP)
    wait_until(lambda: "TLS certificate reloaded" in instance.log(), what="the reload logged")
    assert f"TLS certificate reloaded, SHA-256 fingerprint {fingerprint(certificate)}" in instance.log()

    with smtplib.SMTP_SSL("127.0.0.1", instance.ports["submissions"], timeout=10,
                          context=pki.client_context()) as new_session:
        assert new_session.sock.getpeercert(binary_form=True) == new_der != first
    assert old_session.noop()[0] == 250  # the open session was not dropped
    old_session.quit()

    certificate.write_text("garbage")  # a broken file keeps the old certificate in service
    instance.process.send_signal(signal.SIGHUP)
    wait_until(lambda: "TLS certificate NOT reloaded" in instance.log(), what="the refused reload logged")
    with smtplib.SMTP_SSL("127.0.0.1", instance.ports["submissions"], timeout=10,
                          context=pki.client_context()) as session:
        assert session.sock.getpeercert(binary_form=True) == new_der


def test_cert_issue_gives_a_working_certificate(
    appliance: Callable[..., Appliance], pki: Any, tmp_path: Path,
) -> None:
    """cert issue writes a key (0600) and certificate that log the subscriber in on 465; a second issue is refused."""
    instance = appliance(pki=pki, start=False)
    assert instance.admin("user", "add", "carol@example.org", password="carol-password").returncode == 0
    issued = instance.admin("cert", "issue", "carol", "--out", str(tmp_path / "out"))
    assert issued.returncode == 0, issued.stderr
    key, cert = tmp_path / "out" / "carol.key", tmp_path / "out" / "carol.pem"
    assert key.stat().st_mode & 0o777 == 0o600
    listed = instance.admin("cert", "list", "carol")
    assert "1 certificate(s) for carol" in listed.stdout and "Test Client CA" in listed.stdout
    instance.start()
    context = pki.client_context()
    context.load_cert_chain(str(cert), str(key))
    with smtplib.SMTP_SSL("127.0.0.1", instance.ports["submissions"], timeout=10, context=context) as smtp:
        assert smtp.sendmail("carol@example.org", ["someone@remote.example"], b"Subject: x\r\n\r\ny\r\n") == {}
    assert re.search(r"auth ok: uid=carol login='[^']*CN=carol[^']*' mechanism=certificate", instance.log())
    again = instance.admin("cert", "issue", "carol", "--out", str(tmp_path / "out"))
    assert again.returncode == 1 and "exists already" in again.stderr


def test_cert_issue_without_ca_key_is_a_clear_error(appliance: Callable[..., Appliance]) -> None:
    """cert issue without tls.client_ca_key fails naming that key."""
    instance = appliance(start=False)
    instance.admin("user", "add", "carol@example.org", password="carol-password")
    result = instance.admin("cert", "issue", "carol")
    assert result.returncode == 1 and "tls.client_ca_key" in result.stderr
