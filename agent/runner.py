"""The apply loop: a background thread that moves the actual instances to the desired layout,
one announced wave at a time (see :mod:`agent.state`)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from agent.backends import Backend, BackendError, Interrupted
from agent.state import APPLIED, AgentState, PlanRecord, StateStore

log = logging.getLogger(__name__)


class Applier:
    """Runs waves of the applying plan on a backend, saving the state around each wave.

    Before a wave runs it is saved as *in flight*; after it ran, its effect is saved. A
    wave interrupted by :meth:`stop` (or a crash) stays in flight and is run again when the
    agent starts next, so an apply resumes where it stopped.

    Args:
        store: The state store.
        backend: Where waves run.
        on_applied: Called with the state and the plan each time the loop finishes applying
            a plan (the twin's telemetry); its errors are logged, not raised.
    """

    def __init__(
        self,
        store: StateStore,
        backend: Backend,
        on_applied: Callable[[AgentState, PlanRecord], object] | None = None,
    ) -> None:
        self.store = store
        self.backend = backend
        self.on_applied = on_applied
        self._last: str | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Condition()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Recover the backend and start the loop (a plan left applying resumes)."""
        self.backend.recover(self.store.snapshot().instances)
        self._thread = threading.Thread(
            target=self._loop, name=f"wattplan-apply-{self.store.cluster}", daemon=True
        )
        self._thread.start()

    def poke(self) -> None:
        """Wake the loop: a plan was accepted."""
        self._wake.set()

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no plan is applying; return whether that happened within the time."""
        with self._idle:
            return self._idle.wait_for(
                lambda: self.store.snapshot().applying() is None, timeout=timeout_s
            )

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the loop; a wave in flight is left to the next start."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)

    def _report_applied(self) -> None:
        plan_id, self._last = self._last, None
        if plan_id is None or self.on_applied is None:
            return
        state = self.store.snapshot()
        record = state.plan(plan_id)
        if record is None or record.status != APPLIED:
            return
        try:
            self.on_applied(state, record)
        except Exception:  # telemetry must never stop the apply loop
            log.exception("after applying plan %s", plan_id)

    def _notify(self) -> None:
        with self._idle:
            self._idle.notify_all()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                work = self.store.next_wave()
            except Exception:  # a background thread has no caller to raise to
                log.exception("planning the next wave failed")
                work = None
            if work is None:
                self._report_applied()
                self._notify()
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            record, wave = work
            self._last = record.plan_id
            log.info(
                "plan %s wave %d: %s",
                record.plan_id,
                record.waves + 1,
                ", ".join(f"{s.kind} {s.instance_id}" for s in wave),
            )
            try:
                self.backend.run_wave(wave, self._stop)
            except Interrupted:
                log.info(
                    "plan %s: stopping with a wave in flight; it resumes at the next start",
                    record.plan_id,
                )
                break
            except BackendError as exc:
                log.error("plan %s failed: %s", record.plan_id, exc)
                self.store.fail(record.plan_id, str(exc))
                self._notify()
                continue
            except Exception as exc:  # an unexpected failure must not leave a plan hanging
                log.exception("plan %s: wave failed unexpectedly", record.plan_id)
                self.store.fail(record.plan_id, f"unexpected error: {exc!r}")
                self._notify()
                continue
            self.store.commit_wave()
        self._notify()
