"""Telling a bug from a fault. Ray Train retries every worker error up to train.max_failures, reloading the model
each time: right for a lost node, wasted on a bug that every retry hits again. `StopOnRepeatedError` stops the run
when an attempt fails with the same exception at the same step as an earlier one.

It runs on Ray Train's controller. Raising from a callback is how it stops the run: the controller turns the
exception into a ControllerError, which its failure policy does not retry.
"""

from __future__ import annotations

from ray.train import UserCallback

MESSAGE_CHARS = 2000


class RepeatedError(RuntimeError):
    """An attempt failed exactly as an earlier one did: a bug, not a lost worker."""


def signature(error: BaseException) -> tuple[str, str, int | None]:
    """What makes two failures the same: exception type, message, and the step the loop was at
    (`raytune_sd3_step`, set by train/loop.py; None before the first step). A lost worker's error names its actor
    and node, so two losses never match."""
    return type(error).__name__, str(error)[:MESSAGE_CHARS], getattr(error, "raytune_sd3_step", None)


def describe(sig: tuple[str, str, int | None]) -> str:
    kind, message, step = sig
    where = f"at step {step}" if step is not None else "before the first step"
    return f"{kind} {where}: {message}"


class StopOnRepeatedError(UserCallback):
    """Raise RepeatedError when a worker error repeats one from an earlier attempt of this run."""

    def __init__(self):
        self.seen: set[tuple[str, str, int | None]] = set()
        self.attempts = 0

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        self.attempts += 1
        failures = {signature(e) for e in worker_exceptions.values()}
        repeated = sorted(failures & self.seen, key=str)
        if repeated:
            raise RepeatedError(
                f"attempt {self.attempts} failed as an earlier one did, so retrying cannot help (a bug, not a lost "
                f"worker): {describe(repeated[0])}")
        self.seen |= failures
