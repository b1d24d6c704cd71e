"""Defence at the door: DNS lists, pregreet, HELO/rDNS, greylisting, rate limits, login
guessing and connection floods, sharing one memory across SMTP, IMAP and POP3."""
