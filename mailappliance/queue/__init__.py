"""The outbound queue: durable spool of mail for remote domains (delivery comes next)."""
