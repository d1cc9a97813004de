"""The object-store seam and what parjobs keeps in it: job logs, the ledger, PARs, users, nonces."""
