"""The operator's side of payments: users, their accounts, deposits, statements, the books.

`verify_books` goes beyond the ledger's own invariants: it checks every hold against its job's
log, so value held for a job is charged or refunded when the job ends — never both (the ledger
refuses a second settlement) and never neither (an ended job with an open hold is reported).
"""

from __future__ import annotations

from decimal import Decimal

from orchestrator.core.jobstate import is_terminal
from orchestrator.core.keys import PublicKeys
from orchestrator.core.layout import JobKeys
from orchestrator.errors import JobNotFoundError
from orchestrator.store.base import ObjectStore
from orchestrator.store.eventlog import EventLog
from orchestrator.store.ledger import Ledger
from orchestrator.store.users import UserRegistry
from schemas.auth import UserRecord
from schemas.ledger import StatementRow, Transaction


class Accounts:
    def __init__(self, store: ObjectStore, keys: JobKeys) -> None:
        self.users = UserRegistry(store, keys.users)
        self.ledger = Ledger(store, keys.ledger)
        self._log = EventLog(store, keys.jobs)

    async def add_user(self, name: str, public_key: PublicKeys) -> UserRecord:
        """Register `name` with its public key; its account starts at zero."""
        return await self.users.add(name, public_key)

    async def deposit(self, name: str, amount: Decimal | str) -> Transaction:
        await self.users.get(name)  # only registered users have accounts
        return await self.ledger.deposit(name, amount)

    async def balance(self, name: str) -> Decimal:
        return await self.ledger.balance(name)

    async def statement(self, name: str) -> list[StatementRow]:
        return await self.ledger.statement(name)

    async def verify_books(self) -> list[str]:
        """Every ledger invariant, plus each hold against its job: [] when the books are sound."""
        problems = await self.ledger.verify()
        state = await self.ledger.state()
        for job_uid in state.holds:
            try:
                sheet = await self._log.load(job_uid)
            except JobNotFoundError:
                problems.append(f"value is held for job {job_uid}, which has no log")
                continue
            if is_terminal(sheet.state):
                problems.append(f"job {job_uid} ended {sheet.state.value} but is not settled")
        for job_uid in state.settled:
            sheet = await self._log.load(job_uid)
            if not is_terminal(sheet.state):
                problems.append(f"job {job_uid} was settled while still {sheet.state.value}")
        return problems
