"""A private rspamd (Debian's package) for tests: its own local config dir, dbdir,
rundir and log, the normal worker on a loopback port, DNS only from the test's
zone server, and the modules that would reach out to the Internet (fuzzy
storage, RBLs, phishing feeds, ASN lookups) off."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

from tests.conditions import wait_until
from tests.daemon import free_port

RSPAMD = shutil.which("rspamd") or "/usr/bin/rspamd"
OFF = ("fuzzy_check", "rbl", "phishing", "asn", "emails", "maillist", "neural", "ratelimit", "replies",
       "url_redirector", "metadata_exporter", "clickhouse", "elastic", "external_services", "greylist")


class Rspamd:
    def __init__(self, root: Path, dns_address: str) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        local = root / "local" / "override.d"
        for sub in ("db", "run", "log"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        local.mkdir(parents=True, exist_ok=True)
        (local / "worker-normal.inc").write_text(f'bind_socket = "127.0.0.1:{self.port}";\ncount = 1;\n')
        (local / "worker-controller.inc").write_text(f'bind_socket = "127.0.0.1:{free_port()}";\ncount = 1;\n')
        for worker in ("worker-proxy.inc", "worker-fuzzy.inc"):
            (local / worker).write_text("enabled = false;\n")
        (local / "options.inc").write_text(
            f'dns {{ nameserver = ["{dns_address}"]; timeout = 1s; retransmits = 1; }}\n'
            "local_addrs = [];\n")  # else rspamd skips its DKIM check for mail from loopback
        (local / "logging.inc").write_text(f'type = "file"; filename = "{root}/log/rspamd.log"; level = "info";\n')
        (local / "dkim.conf").write_text("check_local = true;\ncheck_authed = true;\n")
        for module in OFF:
            (local / f"{module}.conf").write_text("enabled = false;\n")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [RSPAMD, "-f", "-c", "/etc/rspamd/rspamd.conf", f"--var=LOCAL_CONFDIR={self.root}/local",
                   f"--var=DBDIR={self.root}/db", f"--var=RUNDIR={self.root}/run", f"--var=LOGDIR={self.root}/log",
                   "-p", str(self.root / "run" / "rspamd.pid")]
        if os.geteuid() == 0:  # rspamd refuses to run its workers as root unless told
            command += ["-u", "root", "-g", "root", "-i"]
        self.process = subprocess.Popen(command, stdout=open(self.root / "stdout.log", "wb"),
                                        stderr=subprocess.STDOUT, start_new_session=True)

        def answers() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"rspamd exited: {(self.root / 'stdout.log').read_text()[-2000:]}")
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        wait_until(answers, 60, what="rspamd answering")

    def check(self, message: bytes, **headers: str) -> dict[str, Any]:
        """rspamd's own verdict on ``message`` (for verifying what we sent)."""
        import json
        import urllib.request

        request = urllib.request.Request(f"{self.url}/checkv2", data=message, method="POST",
                                         headers={k.replace("_", "-"): v for k, v in headers.items()})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
