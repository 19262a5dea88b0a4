"""Trainer callbacks: a rich progress bar, and Ctrl-C that stops at the end of a step.

Ctrl-C during training: stop at the end of the current step, every time.

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


class RichProgressCallback(TrainerCallback):
    """Replaces transformers' tqdm bars with one rich bar showing the latest loss."""

    def __init__(self, description: str = "training") -> None:
        self.description = description
        self.progress = None
        self.task = None
        self.loss: float | None = None

    def on_train_begin(self, args, state, control, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[loss]}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), transient=False,
            console=Console(stderr=True),  # stdout carries only the result (NAME@N)
        )  # fmt: skip
        self.progress.start()
        self.task = self.progress.add_task(
            self.description, total=state.max_steps, completed=state.global_step, loss=""
        )

    def on_step_end(self, args, state, control, **kwargs: Any) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs: Any) -> None:
        if self.progress is not None and logs:
            if "loss" in logs:
                self.loss = float(logs["loss"])
            parts = [f"loss {self.loss:.4f}"] if self.loss is not None else []
            if "eval_loss" in logs:
                parts.append(f"eval {float(logs['eval_loss']):.4f}")
            self.progress.update(self.task, loss="  ".join(parts))

    def on_train_end(self, args, state, control, **kwargs: Any) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)
            self.progress.stop()
            self.progress = None


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
