"""Errors a run raises that outlive it: the sweep reads a failed trial's message to tell a
diverged run from a crashed one, so these import nothing heavy."""

DIVERGED_MESSAGE = "loss became non-finite"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run cannot continue meaningfully."""


class TrialOutOfMemoryError(RuntimeError):
    """The device ran out of memory; the message says what the trial asked of it."""
