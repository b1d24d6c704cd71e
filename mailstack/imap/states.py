"""What every part of an IMAP session shares: the connection states and the way out."""

NOT_AUTH, AUTH, SELECTED, LOGOUT = range(4)
READ_SIZE = 65536
FETCH_BATCH = 500  # messages looked at per step (one thread hop each) by FETCH and SEARCH
# The one empty set every session starts with (recent, keywords, enabled, search result):
# on 3.11 each frozenset() call makes a new 216-byte object, and 10,000 idle sessions held
# four each.  Users rebind (`|=`, `-`), never mutate, or swap in a set of their own first.
EMPTY: frozenset = frozenset()


class Bye(Exception):
    """End the session (after writing what is queued)."""
