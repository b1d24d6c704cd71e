"""Sieve mail filtering (RFC 5228 and extensions): parse, check, run at local delivery."""
