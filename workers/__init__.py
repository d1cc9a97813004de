"""The storage and compute workers and the daemon runtime they share (the orchestration work)."""
