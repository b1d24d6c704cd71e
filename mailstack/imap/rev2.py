"""What changes once a client ENABLEs IMAP4rev2 (RFC 9051 Appendix E), as small helpers the
state mixins call behind `self.rev2`:

* no \\Recent flag and no RECENT responses (SELECT, NOOP, IDLE ...);
* SELECT/EXAMINE: no UNSEEN response code, a LIST response for the mailbox, and
  `* OK [CLOSED]` when another mailbox was selected (also for CONDSTORE/QRESYNC clients,
  RFC 7162 section 3.2.11);
* SEARCH answers with ESEARCH (RFC 4731 form, RETURN (ALL) implied), never `* SEARCH`;
* mailbox names in UTF-8 (parser.py / response.mailbox, as UTF8=ACCEPT);
* a basic LIST marks a name that does not exist \\NonExistent (listing.py).
"""
from __future__ import annotations

REV2 = "IMAP4REV2"
# Extensions after whose ENABLE a SELECT of another mailbox says [CLOSED] first.
CLOSED_FOR = frozenset({REV2, "CONDSTORE", "QRESYNC"})

