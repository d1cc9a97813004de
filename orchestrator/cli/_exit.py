"""How a `parjobs` command ends: its exit status, and any error as one line on stderr.

The root command's `main` runs every command, so it is the one place errors are reported: a usage
error (typer's, or a bad value from `_inputs`), a parjobs refusal (`ParjobsError`, raised here or
sent back by a service), an invalid setting or message (pydantic's `ValidationError`) or a file
the system refused (`OSError`) all become `error: <message>` and exit status 2. Anything else is a
bug in parjobs and keeps its traceback. A command that followed a job to its end exits with how the
job ended (`JOB_END_STATUS`), so a script tells a completed job from one that did not complete.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import typer
from pydantic import ValidationError
from pydantic_core import ErrorDetails
from typer.core import TyperGroup

from orchestrator.errors import ParjobsError
from schemas.events import JobState

EXIT_OK = 0
EXIT_PROBLEMS = 1  # the command ran and found problems: `ledger verify`, `replay`
EXIT_ERROR = 2
# A job followed to its end (`jobs submit`, `jobs watch`) that did not complete:
EXIT_JOB_FAILED = 3
EXIT_JOB_CANCELLED = 4
EXIT_JOB_EXPIRED = 5
JOB_END_STATUS: dict[JobState, int] = {
    JobState.COMPLETED: EXIT_OK,
    JobState.FAILED: EXIT_JOB_FAILED,
    JobState.CANCELLED: EXIT_JOB_CANCELLED,
    JobState.EXPIRED: EXIT_JOB_EXPIRED,
}

EXIT_STATUS_HELP = (
    "Exit status: 0 done; 1 the command ran and found problems (ledger verify, replay); "
    "2 error, told in one line 'error: ...' on stderr: a wrong input (checked before anything "
    "connects), or a refusal by parjobs or one of its services; a job followed to its end "
    "(jobs submit, jobs watch) that did not complete: 3 failed, 4 cancelled, 5 expired; "
    "130 interrupted (Ctrl-C)."
)

REPORTED: tuple[type[Exception], ...] = (
    typer.TyperException,
    ParjobsError,
    ValidationError,
    OSError,
)


def _one_line(text: str) -> str:
    """`text` as one printable line: lines joined, control characters escaped."""
    joined = "; ".join(line.strip() for line in text.splitlines() if line.strip())
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in joined)


def reason(problem: ErrorDetails) -> str:
    """pydantic's message for one problem, without its "Value error, " prefix."""
    if problem["type"] == "value_error" and "error" in problem.get("ctx", {}):
        return str(problem["ctx"]["error"])
    return problem["msg"]


def describe(error: Exception) -> str:
    """What `error: ...` says about one of the `REPORTED` errors."""
    match error:
        case typer.TyperException():
            ctx = getattr(error, "ctx", None)  # usage errors know their command
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            return f"{error.format_message()}{hint}"
        case ValidationError():
            problems = "; ".join(
                f"{'.'.join(str(part) for part in problem['loc']) or 'value'}: {reason(problem)}"
                for problem in error.errors(include_url=False)
            )
            return f"invalid {error.title}: {problems}"
        case OSError(strerror=str(why), filename=name) if name is not None:
            return f"{why}: {name}"
        case ParjobsError() if error.code != ParjobsError.code:
            # The code is what scripts and support can match on; the base class has none to add.
            return f"{str(error) or type(error).__name__} ({error.code})"
        case _:
            return str(error) or type(error).__name__


def _fail(message: str, status: int) -> NoReturn:
    typer.echo(f"error: {_one_line(message)}", err=True)
    sys.exit(status)


class ParjobsGroup(TyperGroup):
    """The root command. Run from the command line, it reports errors as one line (see above)."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:  # a caller that handles errors itself
            return super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        try:
            # Not standalone: typer hands back what a command raised, or its exit status.
            outcome = super().main(
                args, prog_name, complete_var, False, windows_expand_args, **extra
            )
        except typer.Abort:  # end of input, or Ctrl-C, at the passphrase prompt: no answer
            _fail("aborted at the prompt", EXIT_ERROR)
        except REPORTED as error:
            _fail(describe(error), EXIT_ERROR)
        sys.exit(outcome if isinstance(outcome, int) else EXIT_OK)
