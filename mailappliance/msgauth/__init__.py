"""Message authentication: DKIM signing of our subscribers' mail, and SPF, DKIM,
DMARC and ARC verification of mail that arrives on the MX (docs/admin.md,
"Message authentication and spam filtering")."""
