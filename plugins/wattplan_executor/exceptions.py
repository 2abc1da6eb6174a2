"""Typed errors of the serving-cluster API and the one table that maps HTTP statuses to them.

Transient errors (timeouts, connection errors, 408, 429, 5xx) are retried with backoff by
the hook, then raised as they are so that Airflow retries the task; permanent ones are
never retried and are turned into ``AirflowFailException`` by the operators so that the
task fails at once.
"""

from __future__ import annotations

from wattplan.errors import ClusterError


class ClusterTransientError(ClusterError, ConnectionError):
    """The cluster could not answer now (timeout, connection error, 429, 5xx); retry later.

    Attributes:
        retry_after_s: Seconds the cluster asked to wait (``Retry-After``), if it said.
    """

    retry_after_s: float | None = None


class ClusterPermanentError(ClusterError):
    """The cluster refused the request; retrying the same request cannot succeed."""


class ClusterAuthError(ClusterPermanentError, PermissionError):
    """The bearer token is missing or wrong (401/403): fix the Connection's password."""


class ClusterStaleError(ClusterPermanentError):
    """The cluster runs another plan than the change set was based on, or the id is reused (409)."""


class ClusterInvalidError(ClusterPermanentError, ValueError):
    """The cluster rejected the request body (400/422): fix the layout or plan id."""


class ClusterNotFoundError(ClusterPermanentError, LookupError):
    """The cluster does not know the plan or route (404)."""


#: The one table from HTTP status to error class; other 5xx are transient, other 4xx permanent.
STATUS_ERRORS: dict[int, type[ClusterError]] = {
    400: ClusterInvalidError,
    401: ClusterAuthError,
    403: ClusterAuthError,
    404: ClusterNotFoundError,
    408: ClusterTransientError,
    409: ClusterStaleError,
    422: ClusterInvalidError,
    429: ClusterTransientError,
    500: ClusterTransientError,
    502: ClusterTransientError,
    503: ClusterTransientError,
    504: ClusterTransientError,
}


def error_for_status(status_code: int, message: str) -> ClusterError:
    """Return the error to raise for an HTTP error status.

    Args:
        status_code: The HTTP status (>= 400).
        message: What the cluster said, prefixed with the request (``POST /v1/...: ...``).

    Returns:
        An instance of the class :data:`STATUS_ERRORS` maps ``status_code`` to; unlisted 5xx
        statuses give :class:`ClusterTransientError`, other statuses
        :class:`ClusterPermanentError`.
    """
    if status_code in STATUS_ERRORS:
        cls = STATUS_ERRORS[status_code]
    elif status_code >= 500:
        cls = ClusterTransientError
    else:
        cls = ClusterPermanentError
    return cls(f"HTTP {status_code}: {message}")
