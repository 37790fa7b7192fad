"""Peer: a private Postfix (SMTP into its queue, then virtual(8) into Maildir)
and Dovecot (POP3 from that Maildir), both from Debian's packages.

Runs in the foreground until SIGTERM, like the other peers, with every file
under --root: Postfix's config, queue and log, Dovecot's config, runtime
directory and log, and the Maildir (``<root>/mail/alice``).  Needs root
(Postfix's master and Dovecot start as root and drop to their own users) and
the packages postfix and dovecot-pop3d (``./scripts/bench-setup --postfix``).
Nothing of the system's own Postfix or Dovecot is used or touched.

Postfix's 250 means "fsynced into its queue" (cleanup(8) fsyncs the queue
file before smtpd answers); delivery into the Maildir happens after it, so
``bench/run.py`` also waits until every message is in ``new/``.

With ``--submission-port`` and a certificate Postfix also runs a submission
service: TLS required, SASL PLAIN through Dovecot's auth socket.

The password is checked like ours checks it: Dovecot's passdb is a
passwd-file whose hash argon2-cffi made with the defaults ours uses
(``{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=4$...``, the very string ours
stores after ``{ARGON2}``; Dovecot verifies it with libsodium).  Its auth
cache keeps a login as long as ours does (``--cache-ttl``, ours'
``auth.cache_ttl``), but Dovecot 2.3's cache keeps the hash, not the
verdict: every login, SMTP AUTH through Postfix included, computes Argon2id
again (~80-100 ms here), where ours computes it once per cache period.
``--password-scheme plain`` (a static plain-text password) leaves the
password check out, to measure what follows it (bench/pop3_index.py).

    python bench/peers/postfix_dovecot.py --smtp-port 2800 --pop3-port 2810 --root /tmp/peer-postfix
"""

from __future__ import annotations

import argparse
import os
import pwd
import signal
import subprocess
import sys
import time
from pathlib import Path

from peer_options import add_submission_options

USER = "nobody"  # the Maildir owner, for virtual(8) and Dovecot alike
PASSWORD = "alice-password"

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {root}/postfix/queue
data_directory = {root}/postfix/data
mail_owner = postfix
setgid_group = postdrop
maillog_file_prefixes = {root}
maillog_file = {root}/postfix/maillog
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = bench-postfix.example.net
mydestination =
mynetworks = 127.0.0.0/8
alias_maps =
alias_database =
smtpd_recipient_restrictions = reject_unauth_destination
virtual_mailbox_domains = example.org
virtual_mailbox_base = {root}/mail
virtual_mailbox_maps = texthash:{root}/postfix/vmailbox
virtual_minimum_uid = 100
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
message_size_limit = 26214400
smtpd_sasl_type = dovecot
smtpd_sasl_path = private/auth
"""

MAIN_CF_TLS = """\
smtpd_tls_cert_file = {certificate}
smtpd_tls_key_file = {private_key}
"""

SUBMISSION_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
  -o smtpd_tls_security_level=encrypt
  -o smtpd_tls_auth_only=yes
  -o smtpd_sasl_auth_enable=yes
  -o smtpd_recipient_restrictions=permit_sasl_authenticated,reject
"""

# Debian's master.cf without chroot (a chroot would need copies of /etc files)
MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup     unix  n - n 60   1 pickup
cleanup    unix  n - n -    0 cleanup
qmgr       unix  n - n 300  1 qmgr
tlsmgr     unix  - - n 1000? 1 tlsmgr
rewrite    unix  - - n -    - trivial-rewrite
bounce     unix  - - n -    0 bounce
defer      unix  - - n -    0 bounce
trace      unix  - - n -    0 bounce
verify     unix  - - n -    1 verify
flush      unix  n - n 1000? 0 flush
proxymap   unix  - - n -    - proxymap
proxywrite unix  - - n -    1 proxymap
smtp       unix  - - n -    - smtp
relay      unix  - - n -    - smtp
showq      unix  n - n -    - showq
error      unix  - - n -    - error
retry      unix  - - n -    - error
discard    unix  - - n -    - discard
local      unix  - n n -    - local
virtual    unix  - n n -    - virtual
anvil      unix  - - n -    1 anvil
scache     unix  - - n -    1 scache
postlog    unix-dgram n - n - 1 postlogd
"""

PASSDB_STATIC = """\
passdb {{
  driver = static
  args = password={password}
}}
"""

PASSDB_FILE = """\
passdb {{
  driver = passwd-file
  args = {root}/dovecot/passwd
}}
auth_cache_size = 1M
auth_cache_ttl = {cache_ttl} s
auth_cache_negative_ttl = 0
"""

DOVECOT_CONF = """\
instance_name = bench-dovecot-{port}
base_dir = {root}/dovecot/run
state_dir = {root}/dovecot/state
log_path = {root}/dovecot/log
protocols = pop3
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
mail_location = maildir:{root}/mail/%n
first_valid_uid = 1
{passdb}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={root}/mail/%n
}}
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {port}
  }}
}}
service auth {{
  unix_listener {root}/postfix/queue/private/auth {{
    mode = 0660
    user = postfix
    group = postfix
  }}
}}
service imap-login {{
  inet_listener imap {{
    port = 0
  }}
}}
"""


def run(command: list[str], output: Path) -> None:
    """Run a command that starts a daemon (which keeps its inherited output
    open: a pipe would never reach EOF, so its output goes to a file)."""
    with open(output, "ab") as log:
        done = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed (exit {done.returncode}); see {output}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smtp-port", type=int, required=True)
    parser.add_argument("--pop3-port", type=int, required=True)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--password-scheme", choices=("argon2id", "plain"), default="argon2id")
    parser.add_argument("--cache-ttl", type=int, default=60, help="seconds Dovecot's auth cache keeps a login")
    add_submission_options(parser)
    args = parser.parse_args()
    root = args.root.resolve()
    user = pwd.getpwnam(USER)
    values = {"root": root, "uid": user.pw_uid, "gid": user.pw_gid, "password": PASSWORD}
    for path in (root, *root.parents):  # the unprivileged delivery and POP3 processes walk this path
        if path.stat().st_mode & 0o005 != 0o005:
            path.chmod(path.stat().st_mode | 0o005)
    config = root / "postfix" / "etc"
    for sub in (config, root / "postfix" / "queue", root / "postfix" / "data", root / "dovecot"):
        sub.mkdir(parents=True, exist_ok=True)
    mail = root / "mail" / "alice"
    for sub in ("tmp", "new", "cur"):
        (mail / sub).mkdir(parents=True, exist_ok=True)
    for path in (root / "mail", mail, *(mail / s for s in ("tmp", "new", "cur"))):
        os.chown(path, user.pw_uid, user.pw_gid)
    postfix_user = pwd.getpwnam("postfix")
    os.chown(root / "postfix" / "data", postfix_user.pw_uid, postfix_user.pw_gid)
    main_cf, master_cf = MAIN_CF.format(**values), MASTER_CF.format(port=args.smtp_port)
    if args.submission_port:
        main_cf += MAIN_CF_TLS.format(certificate=args.certificate.resolve(), private_key=args.private_key.resolve())
        master_cf += SUBMISSION_CF.format(port=args.submission_port)
    (config / "main.cf").write_text(main_cf)
    (config / "master.cf").write_text(master_cf)
    (root / "postfix" / "vmailbox").write_text("alice@example.org alice/\n")
    dovecot_conf = root / "dovecot" / "dovecot.conf"
    if args.password_scheme == "argon2id":
        from argon2 import PasswordHasher  # argon2-cffi, with the defaults ours hashes with

        (root / "dovecot" / "passwd").write_text(f"alice:{{ARGON2ID}}{PasswordHasher().hash(PASSWORD)}\n")
        passdb = PASSDB_FILE.format(root=root, cache_ttl=args.cache_ttl)
    else:
        passdb = PASSDB_STATIC.format(password=PASSWORD)
    dovecot_conf.write_text(DOVECOT_CONF.format(port=args.pop3_port, passdb=passdb, **values))

    def shutdown() -> None:
        for command in (["postfix", "-c", str(config), "stop"], ["doveadm", "-c", str(dovecot_conf), "stop"]):
            subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(*_: object) -> None:
        shutdown()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    output = root / "start.log"
    try:
        run(["postfix", "-c", str(config), "start"], output)
        run(["dovecot", "-c", str(dovecot_conf)], output)
    except SystemExit:
        shutdown()
        raise
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
