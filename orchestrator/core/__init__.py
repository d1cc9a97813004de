"""The pure core: rules as functions over the wire models, no I/O.

The job state machine, PAR rules, signing and checking of authorisations and cheques, signed
messages, the per-job hash chain and the services' public keys, ledger rules, pricing and the
calculation contract. Everything above (store, broker, services) asks these functions before it
writes anything.
"""
