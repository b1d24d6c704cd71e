"""What every part of an IMAP session shares: the connection states and the way out."""

NOT_AUTH, AUTH, SELECTED, LOGOUT = range(4)
READ_SIZE = 65536
FETCH_BATCH = 500  # messages looked at per step (one thread hop each) by FETCH and SEARCH


class Bye(Exception):
    """End the session (after writing what is queued)."""
