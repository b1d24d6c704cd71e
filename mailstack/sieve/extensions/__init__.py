"""Helpers of single Sieve extensions that are more than a line or two of the interpreter."""
