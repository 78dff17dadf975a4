"""Stop a run cleanly on SIGINT (Ctrl-C), SIGTERM (scancel, kill) and SIGUSR2 (SLURM's preemption or time-limit
warning, which submitit turns into a requeue).

The handler only records the signal; the training loop checks `requested` after each step, checkpoints the
current step, marks the run `interrupted` and returns. The handler that was installed before (submitit's
requeue-and-exit for USR2, its logging for SIGTERM) is then called by `chain()`, so a requeued job resumes
from the checkpoint just written. A second Ctrl-C while the step finishes interrupts at once.
"""

from __future__ import annotations

import signal
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)


class StopSignals:
    def __init__(self) -> None:
        self.requested: signal.Signals | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # signal handlers only work there
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.requested == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: the user does not want to wait for the step
        self.requested = signal.Signals(signum)

    def chain(self) -> None:
        """Call the handler that was there before ours for the received signal, if it was a Python one."""
        previous = self._previous.get(self.requested)
        if callable(previous) and previous is not signal.default_int_handler:
            previous(self.requested, None)
