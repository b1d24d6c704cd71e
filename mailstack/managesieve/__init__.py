"""ManageSieve (RFC 5804): users upload, check and activate their Sieve scripts (port 4190)."""
