"""`python -m orchestrator.cli ...` is `parjobs ...` (how `parjobs dev` starts the daemons)."""

from orchestrator.cli import main

main()
