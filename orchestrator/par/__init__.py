"""PARs: the sealed capability, reading and writing through it, minting it (issuer side)."""
