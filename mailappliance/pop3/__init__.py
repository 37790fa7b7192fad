"""POP3 access to subscribers' Maildirs: our own thin protocol (STLS, CAPA, SASL PLAIN).

``mailbox`` holds the Maildir snapshot, the per-mailbox session lock and the
cred realm; ``server`` holds the protocol and its factory.
"""
