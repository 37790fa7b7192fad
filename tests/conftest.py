"""Fixtures shared by the test suite: the daemon runner (and, as they land, slapd and the PKI)."""

pytest_plugins = ["tests.daemon"]
