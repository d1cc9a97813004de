"""The object-store seam and what parjobs keeps in it: job logs, the ledger, PARs, users, nonces.

`base.ObjectStore` is the seam (a protocol); `s3.S3ObjectStore` implements it on a real S3 server
and `memory.MemoryObjectStore` in memory, presigned URLs included, for tests with no server.
"""
