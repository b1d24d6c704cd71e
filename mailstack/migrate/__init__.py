"""Moving in and out: import from another IMAP server or a Dovecot Maildir tree, export.

    imap.py      copy an account from any IMAP server (aioimaplib), resumable
    dovecot.py   take over a Dovecot Maildir++ tree keeping UIDVALIDITY/UIDs/keywords
    export.py    write an account out as a Maildir++ tree or mbox files
    folders.py   remote names -> local names, special-use matching
    state.py     the journal that makes imports idempotent and resumable
    progress.py  progress bar on a terminal, plain lines otherwise, final summary
    target.py    where imported messages go: the store, plus a running server's wake-up
    cli.py       `mailstack import imap|maildir`, `mailstack export`
"""
