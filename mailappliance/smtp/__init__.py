"""ESMTP server: the MX and submission listeners."""
