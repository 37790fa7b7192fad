"""Content filtering: the rspamd client and what its verdicts lead to."""
