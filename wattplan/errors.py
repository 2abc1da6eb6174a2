"""The project's exception tree: one root, subclasses that also inherit the matching builtin."""


class WattplanError(Exception):
    """Root of every error wattplan raises on purpose."""


class ConfigError(WattplanError, ValueError):
    """A setting from the environment is missing or malformed."""


class DatabaseError(WattplanError, RuntimeError):
    """The database could not be reached, started or migrated."""


class MigrationError(DatabaseError):
    """A migration file is malformed, or an applied migration was edited after it ran."""


class InputDataError(WattplanError, ValueError):
    """An input file (trace, telemetry, price table) cannot be read at all."""


class PlanInputError(WattplanError, ValueError):
    """The optimizer's inputs are inconsistent; the message names the offending keys."""


class InfeasiblePlanError(WattplanError, RuntimeError):
    """No layout satisfies demand, SLO and inventory; the last applied plan stays."""


class CapacityShortfallError(InfeasiblePlanError):
    """Demand exceeds what the inventory, power budgets or change cap can carry.

    ``degraded`` holds the best degraded plan the optimizer found (the most load carried,
    marked degraded, never auto-approved), or ``None`` when none was found in time.
    """

    def __init__(self, message: str, degraded: object | None = None) -> None:
        super().__init__(message)
        self.degraded = degraded


class SolverError(WattplanError, RuntimeError):
    """The solver stopped without a usable solution (time limit with no incumbent, error)."""


class ClusterError(WattplanError, RuntimeError):
    """A serving cluster refused or failed a request."""
