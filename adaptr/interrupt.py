"""Ctrl-C during training: stop at the end of the current step, every time.

A KeyboardInterrupt raised at an arbitrary instant can land where Python only reports it
("Exception ignored in …", e.g. a finalizer run by the garbage collector) and training
then goes on. Instead the first SIGINT only sets a flag, which the Trainer reads after
each step; a second SIGINT raises KeyboardInterrupt at once, as usual.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from transformers import TrainerCallback


class StopOnInterrupt(TrainerCallback):
    """Ends training after the step in which SIGINT arrived; ``requested`` says it did."""

    def __init__(self) -> None:
        self.requested = False

    def on_step_end(self, args, state, control, **kwargs: Any):
        if self.requested:
            control.should_training_stop = True
        return control

    @contextmanager
    def catching_sigint(self) -> Iterator[None]:
        """Route SIGINT to the flag while the block runs (main thread only; elsewhere a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def first(signum, frame) -> None:
            self.requested = True
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second one interrupts

        previous = signal.signal(signal.SIGINT, first)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)
