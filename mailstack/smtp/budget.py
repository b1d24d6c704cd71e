"""The bound on DATA bytes held in memory across all SMTP sessions (smtp.max_data_in_flight).

A session reserves bytes as it reads message text and releases them once the message
is on disk (or refused).  A reservation that would go over the limit fails, and the
session answers 451 4.3.1 instead of growing memory without bound.
"""
from __future__ import annotations


class DataBudget:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def reserve(self, n: int) -> bool:
        if n <= 0:
            return True
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def release(self, n: int) -> None:
        self.used = max(0, self.used - n)


def budget_for(services) -> DataBudget:
    """The one budget of this process, kept with the services; follows config reloads."""
    limit = services.config.smtp.max_data_in_flight
    budget = services.extra.get("smtp_data_budget")
    if budget is None:
        budget = services.extra["smtp_data_budget"] = DataBudget(limit)
    budget.limit = limit
    return budget
