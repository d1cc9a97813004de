"""The access service and the operator's views over the store (accounts, replay)."""
