"""Peer: Twisted's own mail classes, as `twistd mail` would wire them.

`twistd mail` itself fails on Python 3 (it crashes on --user and never
matches command-line domains, see the design notes), so this script builds
what it would have built, with the smallest fixes that make it run (bytes
paths, messages opened in binary mode): twisted.mail.smtp.ESMTP with an IMessageDelivery
that stores into a Maildir through twisted.mail.maildir.MaildirMessage
(temp file, rename into new/; NO fsync before the 250), and Twisted's POP3
over twisted.mail.maildir.MaildirMailbox.

With ``--submission-port`` and a certificate it also listens for
subscribers: ESMTP with STARTTLS and AUTH PLAIN (Twisted's own challenger and
an in-memory checker). With ``--submissions-port`` it also listens with
implicit TLS (``listenSSL``) and offers ``--submissions-auth`` (CRAM-MD5 by
default: the variant issue 15's reviewers measured; no fsync either way).

    python bench/peers/twisted_mail_peer.py --smtp-port 2700 --pop3-port 2710 --maildir /tmp/peer-twisted
"""

from __future__ import annotations

import argparse
from pathlib import Path

from twisted.cred import checkers, credentials, portal
from twisted.internet import reactor, ssl
from twisted.internet.protocol import Factory
from twisted.mail import maildir, pop3, smtp
from twisted.mail._cred import PLAINCredentials
from zope.interface import implementer

from peer_options import add_submission_options, add_submissions_options


@implementer(smtp.IMessageDelivery)
class MaildirDelivery:
    def __init__(self, root: Path) -> None:
        self.root = root

    def receivedHeader(self, helo, origin, recipients):  # noqa: N802 (Twisted's name)
        return b"Received: from " + helo[0] + b" by twisted-mail-peer"

    def validateFrom(self, helo, origin):  # noqa: N802
        return origin

    def validateTo(self, user):  # noqa: N802
        if user.dest.domain != b"example.org":
            raise smtp.SMTPBadRcpt(user)
        path = str(self.root / user.dest.local.decode())
        maildir.initializeMaildir(path)
        return lambda: self._message(path)

    @staticmethod
    def _message(path: str):
        import os
        import tempfile

        fd, tmpname = tempfile.mkstemp(dir=os.path.join(path, "tmp"))
        handle = os.fdopen(fd, "wb")
        final = os.path.join(path, "new", os.path.basename(tmpname))
        return maildir.MaildirMessage(b"alice@example.org", handle, tmpname, final)


class BinaryMaildirMailbox(maildir.MaildirMailbox):
    """Twisted's MaildirMailbox opens messages in text mode, which its own POP3
    cannot send on Python 3; the one fix this peer needs."""

    def getMessage(self, i):  # noqa: N802
        return open(self.list[i], "rb")  # noqa: SIM115


@implementer(portal.IRealm)
class MailboxRealm:
    def __init__(self, root: Path) -> None:
        self.root = root

    def requestAvatar(self, avatar_id, mind, *interfaces):  # noqa: N802
        path = str(self.root / avatar_id.decode())
        maildir.initializeMaildir(path)
        return pop3.IMailbox, BinaryMaildirMailbox(path.encode()), lambda: None  # it wants bytes


class SMTPFactory(smtp.SMTPFactory):
    protocol = smtp.ESMTP

    def __init__(self, delivery: MaildirDelivery) -> None:
        super().__init__()
        self.delivery = delivery

    def buildProtocol(self, addr):  # noqa: N802
        p = super().buildProtocol(addr)
        p.delivery = self.delivery
        return p


@implementer(portal.IRealm)
class SubmissionRealm:
    """A logged-in subscriber delivers through the same Maildir delivery."""

    def __init__(self, delivery: MaildirDelivery) -> None:
        self.delivery = delivery

    def requestAvatar(self, avatar_id, mind, *interfaces):  # noqa: N802
        return smtp.IMessageDelivery, self.delivery, lambda: None


CHALLENGERS = {"PLAIN": PLAINCredentials, "CRAM-MD5": credentials.CramMD5Credentials}


class SubmissionFactory(smtp.SMTPFactory):
    """ESMTP for subscribers: STARTTLS with ``context``, or (``context`` None) a listener
    that is TLS already; AUTH with the ``mechanisms`` named."""

    def __init__(self, delivery_portal: portal.Portal, context: ssl.ContextFactory | None,
                 mechanisms: tuple[str, ...] = ("PLAIN",)) -> None:
        super().__init__(delivery_portal)
        self.context = context
        self.challengers = {name.encode(): CHALLENGERS[name] for name in mechanisms}

    def buildProtocol(self, addr):  # noqa: N802
        p = smtp.ESMTP(dict(self.challengers), self.context)
        p.factory, p.portal, p.host = self, self.portal, b"twisted-mail-peer"
        return p


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smtp-port", type=int, required=True)
    parser.add_argument("--pop3-port", type=int, required=True)
    parser.add_argument("--maildir", type=Path, required=True)
    add_submission_options(parser)
    add_submissions_options(parser)
    args = parser.parse_args()
    args.maildir.mkdir(parents=True, exist_ok=True)
    reactor.listenTCP(args.smtp_port, SMTPFactory(MaildirDelivery(args.maildir)), interface="127.0.0.1")
    users = checkers.InMemoryUsernamePasswordDatabaseDontUse(alice=b"alice-password")
    mail_portal = portal.Portal(MailboxRealm(args.maildir), [users])

    class POP3Factory(Factory):
        def buildProtocol(self, addr):  # noqa: N802
            p = pop3.POP3()
            p.portal = mail_portal
            p.factory = self
            return p

    reactor.listenTCP(args.pop3_port, POP3Factory(), interface="127.0.0.1")
    if args.submission_port:
        context = ssl.DefaultOpenSSLContextFactory(str(args.private_key), str(args.certificate))
        submission_portal = portal.Portal(SubmissionRealm(MaildirDelivery(args.maildir)), [users])
        reactor.listenTCP(args.submission_port, SubmissionFactory(submission_portal, context), interface="127.0.0.1")
    if args.submissions_port:
        context = ssl.DefaultOpenSSLContextFactory(str(args.private_key), str(args.certificate))
        submissions_portal = portal.Portal(SubmissionRealm(MaildirDelivery(args.maildir)), [users])
        reactor.listenSSL(args.submissions_port, SubmissionFactory(submissions_portal, None,
                                                                   tuple(args.submissions_auth)),
                          context, interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    main()
