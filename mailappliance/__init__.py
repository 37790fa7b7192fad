"""mailappliance: an all-in-one mail server (MX, submission, POP3) for small ISPs."""

__version__ = "0.1.0"
