"""Fixtures shared by the test suite: the daemon runner, a private slapd, the test PKI."""

pytest_plugins = ["tests.daemon", "tests.slapd", "tests.pki"]
