"""Mailbox storage: the interface (base.py) and its Maildir backend (maildir.py)."""
