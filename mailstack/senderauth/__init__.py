"""Who sent this mail, by the RFCs: SPF (7208), DKIM (6376, 8463), DMARC (7489), ARC (8617),
Authentication-Results (8601), and SRS for forwarding.

Every evaluator here is pure over a small resolver interface (`records(name, rdtype)`, see
mailstack/dns.py): tests feed zone data from a loopback DNS server, hypothesis fuzzes the
record parsers.  stage.py joins them to the SMTP session (smtp/hooks.py), forward.py to
remote delivery (SRS envelope sender, ARC seal).
"""
