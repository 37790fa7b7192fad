"""The MAIL, RCPT, DATA (and BDAT) stage of an SMTP session.

A mixin of :class:`~mailappliance.smtp.server.SMTPSession`.  Decisions come
from pure modules (policy, screening, limits, quota); storage goes through a
:class:`~mailappliance.delivery.Delivery`: once the final dot is read the
message belongs to the commit, and the session only waits for the outcome.
Per-subscriber rate limits are *reserved* as MAIL and RCPT are accepted and
released when the transaction does not end in a 250, so parallel sessions
cannot overrun them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure

from mailappliance import logs
from mailappliance.budget import network_of
from mailappliance.budget import record_refusal as record_budget_refusal
from mailappliance.delivered_to import delivered_to_header
from mailappliance.delivery import Delivery, SpoolEntry
from mailappliance.directory import DirectoryUnavailable, Subscriber
from mailappliance.dsn_params import (
    MailParameters,
    ParameterError,
    RecipientParameters,
    parse_mail_parameters,
    parse_rcpt_parameters,
)
from mailappliance.folders import delivery_target
from mailappliance.limits import Reservation, subscriber_limits
from mailappliance.maildir import junk_folder, maildir_for
from mailappliance.mailpath import MailPath, NonAsciiAddress, PathSyntaxError, parse_path, split_command_argument
from mailappliance.metrics import METRICS
from mailappliance.policy import Route, decide_recipient, decide_sender
from mailappliance.queue.spool import Envelope
from mailappliance.quota import record_refusal as record_quota_refusal
from mailappliance.screening import screen_sender
from mailappliance.smtp import replies
from mailappliance.smtp.data import DataReader
from mailappliance.smtp.dsn_notices import envelope_fields, notify_local_success
from mailappliance.smtp.inspection import inspect_message, suspension_refusal
from mailappliance.smtp.recipients import ForwardedRecipient, LocalRecipients, RcptOutcome
from mailappliance.trace_headers import received_header, return_path_header, tls_description
from mailappliance.verdicts import Verdict


@attrs.define
class LocalRecipient:
    address: str  # as received (a sub-address kept: Delivered-To shows it)
    subscriber: Subscriber
    maildir: Path
    folder: str = ""  # Maildir++ folder of a sub-address (".lists"), used if it exists


@attrs.define
class Transaction:
    """One MAIL ... DATA transaction."""

    sender: MailPath
    declared_size: int = 0
    reservation: Reservation | None = None  # of an authenticated sender
    local_recipients: list[LocalRecipient] = attrs.Factory(list)
    remote_recipients: list[str] = attrs.Factory(list)
    started: float = attrs.Factory(time.time)  # MAIL: the message's age and the transaction time count from here
    data_ended: float = 0.0  # the final dot
    delivered_to_span: tuple[int, int] = (0, 0)  # the first local recipient's Delivered-To in the file
    trace_length: int = 0  # our Return-Path and Received fields: the client's message starts here
    forwarded: list[ForwardedRecipient] = attrs.Factory(list)  # copies out with an SRS sender
    mail_parameters: MailParameters | None = None  # SIZE, BODY, SMTPUTF8, DSN's RET and ENVID (dsn_params)
    recipient_parameters: dict[str, RecipientParameters] = attrs.Factory(dict)  # accepted address -> NOTIFY, ORCPT

    @property
    def recipient_count(self) -> int:
        return len(self.local_recipients) + len(self.remote_recipients) + len(self.forwarded)

    def release(self) -> None:
        """The transaction ends without a 250: give back what it reserved."""
        if self.reservation is not None:
            self.reservation.release()
            self.reservation = None


class MailTransaction(LocalRecipients):
    """MAIL FROM, RCPT TO, DATA, and the hand-over to the commit."""

    def reset_transaction(self) -> None:
        """RSET, EHLO, STARTTLS, a refused message, a lost connection."""
        if self.held_refusals:
            self.held_refusals.pop("sender", None)
        if self.transaction is not None:
            self.transaction.release()
            self.transaction = None
        if self.delivery is not None:
            self.delivery.abort()
            self.delivery = None
        self.data_reader = None
        self.forget_chunks()  # a BDAT transfer (chunking.py)

    # -- MAIL -------------------------------------------------------------------

    def smtp_MAIL(self, argument: str) -> None:
        if self.helo is None:
            self.error(replies.NEED_HELO)
            return
        self.note_client_name()
        if self.transaction is not None:
            self.error(replies.NESTED_MAIL)
            return
        try:
            path_text, parameters = split_command_argument(argument, "FROM")
        except PathSyntaxError as e:
            self.error(replies.Reply(501, "5.1.7", f"Bad sender address syntax: {e}"))
            return
        problem, mail_parameters = self._mail_parameters(parameters)
        if problem:
            self.error(problem)
            return
        try:
            sender = parse_path(path_text, allow_null=True, utf8=mail_parameters.smtputf8)
        except NonAsciiAddress:
            self.error(replies.NON_ASCII_ADDRESS)
            return
        except PathSyntaxError as e:
            self.error(replies.Reply(501, "5.1.7", f"Bad sender address syntax: {e}"))
            return
        declared_size = mail_parameters.size
        if self.config.require_auth and self.subscriber is None:
            self.error(replies.AUTH_REQUIRED)
            return
        if self.subscriber is None:
            refusal = self._unauthenticated_sender_refusal(sender, declared_size)
            if refusal is not None:
                self.error(refusal)
                return
            self.transaction = Transaction(sender=sender, declared_size=declared_size,
                                           mail_parameters=mail_parameters)
            self.respond(replies.SENDER_OK)
            return
        why = self._sender_refusal(sender, self.subscriber)
        if why:
            METRICS.count("mailappliance_messages_refused_total", reason="sender_not_owned")
            self.log_event(self.log.info, "sender refused: uid={uid} from=<{sender}> reason={why}",
                           uid=self.subscriber.uid, sender=sender.address, why=why)
            self.error(replies.SENDER_NOT_OWNED.with_text(
                f"<{sender.address}>: Sender address rejected: not owned by user"))
            return
        suspended = suspension_refusal(self)  # outgoing spam suspended this subscriber (msgauth)
        if suspended is not None:
            self.error(suspended)
            return
        if self.factory.limits is None:
            self.transaction = Transaction(sender=sender, declared_size=declared_size,
                                           mail_parameters=mail_parameters)
            self.respond(replies.SENDER_OK)
            return
        reservation = self.factory.limits.reservation(
            self.subscriber.uid, subscriber_limits(self.factory.limits.settings, self.subscriber.limits))
        d = reservation.start_message()  # the state store may be Redis: later commands wait for it
        d.addCallback(self._message_reserved, reservation, sender, mail_parameters)
        self.run(d)

    _sender_verdict: tuple[Subscriber, object, MailPath, str | None] | None = None  # the last MAIL's

    def _sender_refusal(self, sender: MailPath, subscriber: Subscriber) -> str | None:
        """``decide_sender``, remembered for the session's last sender: a subscriber sends
        from the same address message after message, and the answer depends only on the
        subscriber record (fixed at login), the config (replaced on reload) and the path."""
        last = self._sender_verdict
        if last is not None and last[0] is subscriber and last[1] is self.config and last[2] == sender:
            return last[3]
        why = decide_sender(sender, subscriber, self.addressing)
        self._sender_verdict = (subscriber, self.config, sender, why)
        return why

    def _message_reserved(self, hit: Verdict | None, reservation: Reservation, sender: MailPath,
                          mail_parameters: MailParameters) -> None:
        if hit is not None or self.closed:
            reservation.release()
            if hit is not None:
                self.limit_hit(hit)
            return
        self.transaction = Transaction(sender=sender, declared_size=mail_parameters.size, reservation=reservation,
                                       mail_parameters=mail_parameters)
        self.respond(replies.SENDER_OK)

    def _unauthenticated_sender_refusal(self, sender: MailPath, declared_size: int) -> replies.Reply | None:
        screening = self.factory.screening
        if screening is not None and self.screening_applies():
            verdict = screen_sender(sender.address, screening.current())
            if not verdict.accepted:
                self.screened(verdict, "mail")
                reply = replies.ACCESS_DENIED.with_text(f"<{sender.address}>: Sender address rejected: Access denied")
                if not self.hold_screening("sender", verdict, reply):
                    return reply
        budget = self.factory.network_budget
        if budget is not None and self.config.role == "mx" and not budget.may_receive(self.client_ip, declared_size):
            record_budget_refusal()
            self.log_event(self.log.info, "network byte budget exhausted network={network}",
                           network=network_of(self.client_ip))
            return replies.NETWORK_BUDGET
        return None

    def _mail_parameters(self, parameters: list[str]) -> tuple[replies.Reply | None, MailParameters]:
        if parameters and not self.esmtp:
            return replies.Reply(555, "5.5.4", "Error: MAIL parameters need EHLO"), MailParameters()
        try:
            return None, parse_mail_parameters(parameters, self.config.max_message_size)
        except ParameterError as e:
            return replies.for_parameter_error(e), MailParameters()

    # -- RCPT -------------------------------------------------------------------

    def smtp_RCPT(self, argument: str) -> None:
        transaction = self.transaction
        if transaction is None:
            self.error(replies.NEED_MAIL)
            return
        if self.refuse_mixing():  # RCPT after BDAT (chunking.py)
            return
        smtputf8 = transaction.mail_parameters is not None and transaction.mail_parameters.smtputf8
        try:
            path_text, parameters = split_command_argument(argument, "TO")
            recipient = parse_path(path_text, allow_null=False, utf8=smtputf8)
            rcpt_parameters = parse_rcpt_parameters(parameters) if parameters else None  # DSN
        except NonAsciiAddress:
            self.error(replies.NON_ASCII_ADDRESS)
            return
        except PathSyntaxError as e:
            self.error(replies.Reply(501, "5.1.3", f"Bad recipient address syntax: {e}"))
            return
        except ParameterError as e:
            self.error(replies.for_parameter_error(e))
            return
        if transaction.recipient_count >= self.config.max_recipients:
            self.respond(replies.TOO_MANY_RECIPIENTS)
            return
        held = self.held_refusal(recipient)
        if held is not None:
            self.error(held)
            return
        if recipient.local_part.lower() == "postmaster" and not recipient.domain:
            recipient = attrs.evolve(recipient, domain=self.addressing.default_domain)
        verdict = decide_recipient(recipient, self.addressing.accepted_domains, self.subscriber is not None)
        if verdict.refused:
            METRICS.count("mailappliance_messages_refused_total", reason=verdict.reason.replace(" ", "_"))
            self.log_event(self.log.info, "relay refused rcpt=<{rcpt}> reason={reason}",
                           rcpt=recipient.address, reason=verdict.reason)
            reply = replies.for_relay(verdict.verdict)
            self.error(reply.with_text(f"<{recipient.address}>: {reply.text}"))
            return
        if verdict.route is Route.REMOTE:
            self._accept_remote(transaction, recipient, rcpt_parameters)
            return
        address = recipient.address.lower()
        self.run_coroutine(self.resolve_local(recipient),
                           lambda outcome: self._rcpt_decided(outcome, address, rcpt_parameters),
                           lambda failure: self._rcpt_lookup_failed(failure, address))

    def _reserve_recipient(self, transaction: Transaction, accept: Callable[[], None]) -> Deferred[None] | None:
        """Count an accepted recipient against the sender's hourly limit, at once
        (parallel sessions see it; the state store may be Redis), then ``accept``
        it and answer; or answer that the limit is reached.  Without hourly limits
        (no reservation: mail from outside) it is accepted at once."""
        if transaction.reservation is None:
            self._recipient_reserved(None, accept)
            return None
        return transaction.reservation.add_recipient().addCallback(self._recipient_reserved, accept)

    def _recipient_reserved(self, hit: Verdict | None, accept: Callable[[], None]) -> None:
        if hit is not None:
            self.limit_hit(hit)
            return
        accept()
        self.respond(replies.RECIPIENT_OK)

    async def _local_recipient(self, subscriber: Subscriber | None, address: str) -> replies.Reply | LocalRecipient:
        if subscriber is None:
            METRICS.count("mailappliance_messages_refused_total", reason="unknown_user")
            self.log_event(self.log.info, "unknown recipient <{rcpt}>", rcpt=address)
            return replies.UNKNOWN_USER
        if subscriber.disabled:
            return replies.MAILBOX_DISABLED
        try:
            maildir = maildir_for(self.config.maildir_root, subscriber.uid)
        except ValueError:
            self.log_event(self.log.error, "directory entry {dn} has an unsafe uid {uid!r}: refusing <{rcpt}>",
                           dn=subscriber.dn, uid=subscriber.uid, rcpt=address)
            return replies.MAILBOX_MISCONFIGURED
        quotas = self.factory.quotas
        if quotas is not None:
            declared = self.transaction.declared_size if self.transaction is not None else 0
            try:
                verdict = quotas.check_now(subscriber, declared) or await quotas.check(subscriber, maildir, declared)
            except OSError as e:
                self.log_event(self.log.error, "cannot measure the mailbox of {uid}: {why}",
                               uid=subscriber.uid, why=str(e))
                return replies.TEMP_LOOKUP_FAILURE
            if verdict.full:
                record_quota_refusal("rcpt")
                self.log_event(self.log.info, "mailbox full: uid={uid} usage={usage} limit={limit} rcpt=<{rcpt}>",
                               uid=subscriber.uid, usage=verdict.usage, limit=verdict.limit, rcpt=address)
                return replies.MAILBOX_FULL
        return LocalRecipient(address, subscriber, maildir)

    def _rcpt_decided(self, outcome: replies.Reply | RcptOutcome, address: str,
                      rcpt_parameters: RecipientParameters | None = None) -> Deferred[None] | None:
        transaction = self.transaction
        if isinstance(outcome, replies.Reply):
            if outcome.permanent:
                self.error(outcome.with_text(f"<{address}>: {outcome.text}"))
            else:
                self.respond(outcome.with_text(f"<{address}>: {outcome.text}"))
            return None
        if transaction is None:  # the connection ended meanwhile
            return None
        def accept() -> None:
            self.add_outcome(transaction, outcome)
            if rcpt_parameters:
                transaction.recipient_parameters[outcome.address] = rcpt_parameters

        return self._reserve_recipient(transaction, accept)

    def _rcpt_lookup_failed(self, failure: Failure, address: str) -> None:
        if not failure.check(DirectoryUnavailable):
            self.log_event(self.log.failure, "recipient lookup failed", failure=failure)
        else:
            self.log_event(self.log.warn, "directory unavailable for <{rcpt}>: {why}",
                           rcpt=address, why=failure.getErrorMessage())
        self.respond(replies.TEMP_LOOKUP_FAILURE.with_text(f"<{address}>: {replies.TEMP_LOOKUP_FAILURE.text}"))

    def _accept_remote(self, transaction: Transaction, recipient: MailPath,
                       rcpt_parameters: RecipientParameters | None = None) -> None:
        """An authenticated subscriber's mail for another domain: to the outbound spool."""
        if self.factory.spool is None:
            self.error(replies.RELAY_DENIED.with_text(f"<{recipient.address}>: Relay access denied"))
            return

        def accept() -> None:
            transaction.remote_recipients.append(recipient.address)
            if rcpt_parameters:
                transaction.recipient_parameters[recipient.address] = rcpt_parameters

        reserving = self._reserve_recipient(transaction, accept)
        if reserving is not None:
            self.run(reserving)

    # -- DATA -------------------------------------------------------------------

    def smtp_DATA(self, argument: str) -> None:
        transaction = self.transaction
        if transaction is None:
            self.error(replies.NEED_MAIL)
            return
        if not transaction.recipient_count:
            self.error(replies.NO_VALID_RECIPIENTS)
            return
        if argument:
            self.error(replies.Reply(501, "5.5.4", "Syntax: DATA"))
            return
        if self.refuse_mixing():  # DATA after BDAT (chunking.py)
            return
        if not self.start_message(transaction):
            return
        assert self.delivery is not None
        self.data_reader = DataReader(self.delivery.write, self.config.max_message_size, self.config.max_line_length,
                                      normalize_line_endings=self.config.normalize_line_endings)
        self.data_started = self.clock.seconds()
        self.respond(replies.START_DATA)

    def start_message(self, transaction: Transaction) -> bool:
        """Stage the message with our trace fields (DATA and the first BDAT); False when
        storage failed (answered 451, transaction ended)."""
        try:
            delivery = Delivery(self.config.incoming_dir)
            # Return-Path belongs to final delivery only: the spool copy skips it (body_offset)
            delivery.write(return_path_header(transaction.sender.address))
            if transaction.local_recipients:  # RFC 9228; the others' copies get their own (delivered_to.py)
                start = delivery.size
                delivery.write(delivered_to_header(transaction.local_recipients[0].address))
                transaction.delivered_to_span = (start, delivery.size)
            self.return_path_length = delivery.size  # the spool's copy starts after Return-Path and Delivered-To
            delivery.write(self._received_header(transaction, delivery.name))
            transaction.trace_length = delivery.size
        except OSError as e:
            self.log_event(self.log.error, "cannot start message: {why}", why=str(e))
            self.reset_transaction()
            self.respond(replies.STORAGE_UNAVAILABLE)
            return False
        self.delivery = delivery
        return True

    def _received_header(self, transaction: Transaction, message_id: str) -> bytes:
        utf8 = transaction.mail_parameters is not None and transaction.mail_parameters.smtputf8
        protocol_name = "UTF8SMTP" if utf8 else "ESMTP" if self.esmtp else "SMTP"  # RFC 6531 3.7.3
        if self.esmtp and (self.secure or self.subscriber):  # RFC 3848
            protocol_name += ("S" if self.secure else "") + ("A" if self.subscriber else "")
        identity = None
        if self.subscriber is not None:
            identity = f"{self.subscriber.uid} via {self.auth_method}"
        return received_header(
            helo=self.helo or "unknown",
            client_ip=self.client_ip,
            hostname=self.config.hostname,
            protocol=protocol_name,
            message_id=message_id,
            recipients=list(dict.fromkeys([r.address for r in transaction.local_recipients]
                                          + transaction.remote_recipients
                                          + [f.address for f in transaction.forwarded])),
            authenticated_as=identity,
            client_name=self.trace_name or (self.client_facts.name if self.client_facts else None),
            tls=self._tls_words() if self.secure else None,
        )

    _tls_description: str | None = None  # the Received header's TLS words, once per session

    def _tls_words(self) -> str | None:
        """Version and cipher of this session's TLS, asked of OpenSSL once (they cannot change:
        no renegotiation, and STARTTLS happens once): each call into OpenSSL releases the GIL."""
        if self._tls_description is None:
            self._tls_description = tls_description(self.transport)
        return self._tls_description

    trace_name: str | None = None  # the client's confirmed reverse name, once looked up (note_client_name)

    def note_client_name(self) -> None:
        """Start looking up the client's forward-confirmed reverse name for the Received
        header, once per session and without waiting: screening's answer when it has
        one; a lookup that has not answered by DATA leaves "unknown"."""
        client_lookup = self.factory.client_lookup
        if self.trace_name is not None or client_lookup is None:
            return
        if self.client_facts is not None and self.client_facts.name:
            self.trace_name = self.client_facts.name
            return
        self.trace_name = ""

        def found(name: str | None) -> None:
            self.trace_name = name or ""

        d = Deferred.fromCoroutine(client_lookup.trace_name(self.client_ip))
        d.addCallbacks(found, lambda failure: None)

    def end_of_data(self) -> None:
        """The final dot: refuse, or hand the message to the commit (it is not ours after that)."""
        reader, delivery, transaction = self.data_reader, self.delivery, self.transaction
        assert reader is not None and delivery is not None and transaction is not None
        self.data_reader, self.delivery, self.transaction = None, None, None
        refusal = self._data_refusal(reader)
        if refusal is not None:
            delivery.abort()
            transaction.release()
            METRICS.count("mailappliance_messages_refused_total", reason="message_content")
            self.log_event(self.log.info, "message refused: {why}", why=refusal.text)
            self.respond(refusal)
            return
        d = Deferred.fromCoroutine(self._commit(delivery, transaction))
        self.run(d)

    async def _commit(self, delivery: Delivery, transaction: Transaction) -> None:
        transaction.data_ended = time.time()
        checked = await inspect_message(self, delivery, transaction)  # authentication, content filter, DKIM
        if checked.reply is not None:
            delivery.abort()
            transaction.release()
            self.respond(checked.reply)
            return
        admission = None
        if self.factory.quotas is not None and transaction.local_recipients:
            try:
                admission = await self.factory.quotas.admit(
                    [(r.subscriber, r.maildir) for r in transaction.local_recipients], delivery.size)
            except OSError as e:
                delivery.abort()
                transaction.release()
                self.log_event(self.log.error, "cannot measure a recipient's mailbox: {why}", why=str(e))
                self.respond(replies.STORAGE_UNAVAILABLE)
                return
            if admission.full:
                delivery.abort()
                transaction.release()
                record_quota_refusal("data")
                full = next(r for r in transaction.local_recipients if r.subscriber.uid in admission.full)
                verdict = admission.verdicts[full.subscriber.uid]
                self.log_event(self.log.info, "mailbox full at end of DATA: uid={uid} usage={usage} "
                               "limit={limit} size={size}", uid=full.subscriber.uid,
                               usage=verdict.usage, limit=verdict.limit, size=delivery.size)
                self.respond(replies.MAILBOX_FULL_DATA.with_text(f"<{full.address}>: Mailbox full"))
                return
        entries = []
        if transaction.remote_recipients:
            assert self.factory.spool is not None
            entries.append(SpoolEntry(self.factory.spool, Envelope.new(
                queue_id=delivery.name,
                sender=transaction.sender.address,
                recipients=transaction.remote_recipients,
                authenticated_as=self.subscriber.uid if self.subscriber else "",
                client_ip=self.client_ip,
                session_id=self.session_id,
                body_offset=self.return_path_length,
                **envelope_fields(transaction, transaction.remote_recipients),
            )))
        entries.extend(self.forward_entries(delivery, transaction))
        maildirs = [junk_folder(r.maildir) if r.address in checked.junk else delivery_target(r.maildir, r.folder)
                    for r in transaction.local_recipients]
        self.committing = delivery  # session_ended abandons it while it waits for its disk (delivery.py)
        try:
            paths = await delivery.commit(self.factory.commit, maildirs, entries,
                                          [delivered_to_header(r.address) for r in transaction.local_recipients],
                                          transaction.delivered_to_span)
        except Exception as e:
            transaction.release()
            if admission is not None:
                admission.release()
            if isinstance(e, CancelledError):  # abandoned: the client left before its 250
                self.log_event(self.log.info, "client gone while its message waited for the disk: dropped")
                return
            self.log_event(self.log.failure, "delivery failed", failure=Failure())
            self.respond(replies.DELIVERY_FAILED)
            return
        finally:
            self.committing = None
        if admission is not None:
            admission.delivered()
        self._stored(delivery, transaction, paths)

    def _data_refusal(self, reader: DataReader) -> replies.Reply | None:
        problems = reader.problems
        if problems.too_big:
            return replies.MESSAGE_TOO_BIG
        if problems.bare_line_ending:
            return replies.BARE_LINE_ENDING
        if problems.too_many_hops:  # a forwarding loop (ours or someone else's) ends here
            return replies.TOO_MANY_HOPS
        if problems.line_too_long:
            return replies.Reply(550, "5.6.0", f"Error: message has a line longer than "
                                               f"{self.config.max_line_length} octets (RFC 5321 4.5.3.1.6)")
        return None

    def _stored(self, delivery: Delivery, transaction: Transaction, paths: list[Path] | None = None) -> None:
        METRICS.count("mailappliance_messages_accepted_total", role=self.config.role)
        METRICS.observe("mailappliance_smtp_transaction_seconds", time.time() - transaction.started,
                        role=self.config.role)
        if transaction.reservation is not None:
            transaction.reservation.commit()
        if self.subscriber is None and self.factory.network_budget is not None and self.config.role == "mx":
            self.factory.network_budget.received(self.client_ip, delivery.size)
        self.log_event(
            self.log.info,
            "accepted id={id} from=<{sender}> rcpts={count} remote={remote} size={size} uid={uid}",
            id=delivery.name, sender=transaction.sender.address, count=transaction.recipient_count,
            remote=len(transaction.remote_recipients), size=delivery.size,
            uid=self.subscriber.uid if self.subscriber else "-",
        )
        self._log_local_deliveries(delivery, transaction, paths or [])
        self.respond(replies.Reply(250, "2.0.0", f"Ok: queued as {delivery.name}"))
        notify_local_success(self, delivery.name, transaction, paths or [])  # NOTIFY=SUCCESS (RFC 3461)
        if transaction.remote_recipients:
            self.factory.on_queued()

    def _log_local_deliveries(self, delivery: Delivery, transaction: Transaction, paths: list[Path]) -> None:
        """One line per local recipient, Postfix-style: did mail for X arrive, and where is it
        (the file under maildir_root). delays=a/b/c: receiving / connecting (none) / storing."""
        if logs.info_dropped():
            return  # the level drops these lines: don't work out where each file went
        now = time.time()
        receiving = max(0.0, transaction.data_ended - transaction.started)
        storing = max(0.0, now - transaction.data_ended)
        root = str(self.config.maildir_root) + os.sep
        files: dict[Path, Path] = {}  # Maildir (or its folder's Maildir) -> the file delivered there
        for path in paths:
            folder = path.parent.parent
            files.setdefault(folder, path)
            files.setdefault(folder.parent, path)  # a Maildir++ folder (.Junk, +tag) of that Maildir
        for recipient in transaction.local_recipients:
            where = str(files.get(recipient.maildir, recipient.maildir)).removeprefix(root)
            self.log_event(
                self.log.info,
                "delivered id={id} to=<{to}> orig_to=<{orig_to}> relay=local delay={delay:.2f} "
                "delays={receiving:.2f}/0/{storing:.2f} dsn=2.0.0 status=sent (delivered to maildir {where})",
                id=delivery.name, to=recipient.subscriber.mail or recipient.address, orig_to=recipient.address,
                delay=now - transaction.started, receiving=receiving, storing=storing, where=where,
            )
