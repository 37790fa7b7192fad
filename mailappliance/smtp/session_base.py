"""The SMTP session as its stages see it: one base class for the mixins.

:class:`~mailappliance.smtp.server.SMTPSession` is built from one mixin per
stage (:mod:`.auth`, :mod:`.chunking`, :mod:`.recipients`,
:mod:`.transaction`), and each stage calls the others through ``self``.  This
base declares, for the type checker, the session's state and the methods one
stage calls in another, so that every mixin is checked against the same
session.  At run time it adds only the slots of that state (an idle
connection must stay small: no per-session dict); the methods are declared
only under ``TYPE_CHECKING`` (the session implements each of them).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import TYPE_CHECKING

from mailappliance.linesession import LineSession

if TYPE_CHECKING:
    from mailappliance.delivery import Delivery
    from mailappliance.directory import Subscriber
    from mailappliance.sasl import SaslExchange
    from mailappliance.screening import ClientFacts
    from mailappliance.smtp import replies
    from mailappliance.smtp.chunking import ChunkedTransfer
    from mailappliance.smtp.data import DataReader
    from mailappliance.smtp.server import SMTPConfig, SMTPFactory
    from mailappliance.smtp.transaction import LocalRecipient, Transaction
    from mailappliance.verdicts import Verdict


class SMTPSessionBase(LineSession):
    """The state every stage of an SMTP session shares (set in ``SMTPSession.__init__``)."""

    # One slot per attribute below (a stage's new state belongs here too, or it
    # lands in a per-session dict); the kernel's own are LineSession's.
    __slots__ = ("config", "helo", "esmtp", "secure", "tls_started", "errors", "client_facts", "client_allowed",
                 "held_refusals", "subscriber", "auth_method", "sasl", "transaction", "delivery", "data_reader",
                 "committing", "data_started", "return_path_length", "chunked", "skip_octets")

    factory: SMTPFactory
    config: SMTPConfig
    helo: str | None
    esmtp: bool
    secure: bool  # TLS is up
    tls_started: bool  # STARTTLS answered, or an implicit TLS listener
    errors: int
    client_facts: ClientFacts | None  # what screening learnt about the client (kept only if it found a name)
    client_allowed: bool  # an allow rule matched: no screening after connect
    held_refusals: dict[str, tuple[Verdict, replies.Reply]] | None  # screening refusals waiting for RCPT (None: none)
    subscriber: Subscriber | None  # logged in (AUTH or client certificate)
    auth_method: str
    sasl: SaslExchange | None  # an AUTH exchange waiting for the client's next line
    transaction: Transaction | None
    delivery: Delivery | None  # the message being received
    committing: Delivery | None  # the message past its final dot, until its commit's outcome
    data_reader: DataReader | None
    data_started: float
    return_path_length: int
    chunked: ChunkedTransfer | None  # a message arriving in BDAT chunks
    skip_octets: int  # of a refused BDAT chunk

    if TYPE_CHECKING:
        # server.py: replies and screening
        @abstractmethod
        def respond(self, reply: replies.Reply) -> None: ...

        @abstractmethod
        def error(self, reply: replies.Reply) -> None: ...

        @abstractmethod
        def close_with(self, reply: replies.Reply) -> None: ...

        @abstractmethod
        def screened(self, verdict: Verdict, stage: str) -> None: ...

        @abstractmethod
        def screening_applies(self) -> bool: ...

        @abstractmethod
        def limit_hit(self, hit: Verdict) -> None: ...

        # transaction.py: MAIL, RCPT, DATA
        @abstractmethod
        def reset_transaction(self) -> None: ...

        @abstractmethod
        def start_message(self, transaction: Transaction) -> bool: ...

        @abstractmethod
        def end_of_data(self) -> None: ...

        @abstractmethod
        async def _local_recipient(self, subscriber: Subscriber | None,
                                   address: str) -> replies.Reply | LocalRecipient: ...

        # chunking.py: BDAT
        @abstractmethod
        def refuse_mixing(self) -> bool: ...

        @abstractmethod
        def forget_chunks(self) -> None: ...
