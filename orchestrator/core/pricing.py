"""What a job may cost (held before it runs) and what it is charged once it has ended."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from orchestrator.core.calculations import CalculationRegistry
from schemas.events import JobRequest, JobSheetState, JobState
from schemas.ledger import to_money


@dataclass(frozen=True)
class Pricing:
    """What a run may cost at most: the calculation's price for its whole time limit."""

    calculations: CalculationRegistry
    time_limit_s: float

    def highest(self, request: JobRequest) -> Decimal:
        calculation = self.calculations.get(request.calculation)
        self.calculations.validate(request.calculation, request.parameters)
        return to_money(calculation.price.cost(self.time_limit_s))

    def charge(self, sheet: JobSheetState) -> Decimal:
        """A completed job pays for the CPU it used (never above what was held); others nothing.

        A failed run is refunded in full: it may have failed for reasons that are ours (a
        worker's limit, a crash) rather than the user's, and we cannot tell them apart here.
        """
        if sheet.payment is None or sheet.state is not JobState.COMPLETED:
            return Decimal(0)
        price = self.calculations.get(sheet.request.calculation).price
        return min(sheet.payment.held, to_money(price.cost(sheet.cpu_seconds)))
