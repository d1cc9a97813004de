"""The built-in calculations that run a script of this package: checksum, csv-summary, sleep.

Each child script (`_builtin_<name>.py`) uses the standard library only and runs as
`python -I -u <script>`: isolated from the environment and the current directory, so it needs no
PYTHONPATH, and unbuffered (-I ignores PYTHONUNBUFFERED) so progress lines arrive as printed.
"""

from __future__ import annotations

import sys
from decimal import Decimal
from pathlib import Path

from pydantic import Field, field_validator

from orchestrator.core.calculations import Calculation, CalculationParams, Invocation, Price

SUMMARY = "summary.json"


def _script_argv(name: str, *args: str) -> tuple[str, ...]:
    script = Path(__file__).with_name(f"_builtin_{name}.py")
    return (sys.executable, "-I", "-u", str(script), *args)


class ChecksumParams(CalculationParams):
    byte_stats: bool = True
    """Also count every byte value (distinct bytes, most common, entropy); about 25 MB/s."""


class Checksum(Calculation[ChecksumParams]):
    """SHA-256, size, line count and byte statistics of the input."""

    name = "checksum"
    Params = ChecksumParams
    price = Price(fixed=Decimal("0.01"), per_cpu_second=Decimal("0.001"))
    summary = "SHA-256, size, lines and byte statistics of the input -> summary.json"

    def invocation(
        self, params: ChecksumParams, *, input_path: Path, output_dir: Path
    ) -> Invocation:
        flags = () if params.byte_stats else ("--no-byte-stats",)
        argv = _script_argv("checksum", str(input_path), str(output_dir), *flags)
        return Invocation(argv=argv, outputs=(SUMMARY,))


class CsvSummaryParams(CalculationParams):
    delimiter: str = Field(default=",", min_length=1, max_length=1)
    header: bool = True
    """The first row names the columns (otherwise they are column_1, column_2, ...)."""

    @field_validator("delimiter")
    @classmethod
    def _usable_delimiter(cls, value: str) -> str:
        if value in '\r\n"' or (not value.isprintable() and value != "\t"):
            raise ValueError("the delimiter must be a printable character or a tab, not a quote")
        return value


class CsvSummary(Calculation[CsvSummaryParams]):
    """Rows, and per column: filled/empty counts, numeric statistics, distinct and top values."""

    name = "csv-summary"
    Params = CsvSummaryParams
    price = Price(fixed=Decimal("0.02"), per_cpu_second=Decimal("0.001"))
    summary = "per-column statistics of a CSV file -> summary.json"

    def invocation(
        self, params: CsvSummaryParams, *, input_path: Path, output_dir: Path
    ) -> Invocation:
        flags = ("--delimiter", params.delimiter) + (() if params.header else ("--no-header",))
        argv = _script_argv("csv_summary", str(input_path), str(output_dir), *flags)
        return Invocation(argv=argv, outputs=(SUMMARY,))


class SleepParams(CalculationParams):
    seconds: float = Field(ge=0, le=3600)
    exit_code: int = Field(default=0, ge=0, le=125)
    """Exit with this code after sleeping, to try out how failures are reported."""


class Sleep(Calculation[SleepParams]):
    """Sleeps, printing progress every second. For tests and demos of progress, stop and expiry."""

    name = "sleep"
    Params = SleepParams
    price = Price(per_cpu_second=Decimal("0.001"))
    summary = "sleep N seconds printing progress (for tests and demos) -> summary.json"

    def invocation(self, params: SleepParams, *, input_path: Path, output_dir: Path) -> Invocation:
        argv = _script_argv(
            "sleep", str(params.seconds), str(output_dir), "--exit-code", str(params.exit_code)
        )
        return Invocation(argv=argv, outputs=(SUMMARY,))
