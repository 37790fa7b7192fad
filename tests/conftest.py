"""Fixtures shared by the test suite: the daemon runner, a private slapd, a private
redis-server, the test PKI."""

pytest_plugins = ["tests.daemon", "tests.slapd", "tests.redis_server", "tests.pki"]
