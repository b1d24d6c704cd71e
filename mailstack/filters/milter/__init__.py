"""Milter client: the Sendmail/Postfix milter protocol v6 (codec.py: pure; client.py: I/O;
chain.py: how the milters follow one SMTP session)."""
