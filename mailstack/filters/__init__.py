"""Content filters at the end of DATA (milters, rspamd, SpamAssassin's spamd, ClamAV's
clamd) and learning from what users do with the Junk folder.

chain.py is the SMTP stage (smtp/hooks.py contract) that runs them in the configured
order with their timeouts and default actions; each filter module speaks one daemon's
protocol; learn.py reports Junk moves; prefs.py holds the per-user "spam to INBOX" choice.
"""
