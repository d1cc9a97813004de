"""The `parjobs` command line (typer): keys, the daemons, local development, jobs, operations."""

from orchestrator.cli._app import app, main

__all__ = ["app", "main"]
