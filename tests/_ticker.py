"""`ticker`: a calculation that prints a numbered line every so often, to measure progress."""

from __future__ import annotations

import sys
from decimal import Decimal
from pathlib import Path

from pydantic import Field

from orchestrator.core.calculations import Calculation, CalculationParams, Invocation, Price

_SCRIPT = """
import sys, time
lines, every = int(sys.argv[1]), float(sys.argv[2])
for i in range(1, lines + 1):
    time.sleep(every)
    print(f"tick {i}/{lines}", flush=True)
"""


class TickerParams(CalculationParams):
    lines: int = Field(ge=1, le=100_000)
    every_s: float = Field(gt=0, le=60)


class Ticker(Calculation[TickerParams]):
    """Prints `tick <i>/<lines>` every `every_s` seconds; writes nothing."""

    name = "ticker"
    Params = TickerParams
    price = Price(per_cpu_second=Decimal("0.001"))

    def invocation(self, params: TickerParams, *, input_path: Path, output_dir: Path) -> Invocation:
        argv = (sys.executable, "-I", "-u", "-c", _SCRIPT, str(params.lines), str(params.every_s))
        return Invocation(argv=argv)


def last_line(lines: int) -> str:
    """The progress message of the ticker's last line."""
    return f"stdout: tick {lines}/{lines}"
