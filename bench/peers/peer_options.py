"""Command-line options every peer shares (the peers are run as scripts from this folder)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_submission_options(parser: argparse.ArgumentParser) -> None:
    """--submission-port with the certificate and key its STARTTLS uses (the bench makes them)."""
    parser.add_argument("--submission-port", type=int)
    parser.add_argument("--certificate", type=Path)
    parser.add_argument("--private-key", type=Path)


def add_submissions_options(parser: argparse.ArgumentParser) -> None:
    """--submissions-port: subscribers over implicit TLS (port 465 style, same certificate), and the
    SASL mechanisms offered there (issue 15's reviewers ran Twisted with implicit TLS and CRAM-MD5)."""
    parser.add_argument("--submissions-port", type=int)
    parser.add_argument("--submissions-auth", nargs="+", choices=("PLAIN", "CRAM-MD5"), default=["CRAM-MD5"])
