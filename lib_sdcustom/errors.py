"""Errors a user can act on.

Every failure caused by input (a bad folder, a wrong option, an unusable checkpoint) is raised as a
`UserFacingError`: a message that names the thing at fault and a `fix` that says what to do. The CLI and
the tab print these without a stack trace; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserFacingError(Exception):
    """A problem with the user's input, reported as 'what is wrong' plus 'how to fix it'."""

    def __init__(self, problem: str, fix: str = "") -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}\n  Fix: {fix}" if fix else problem)


class ConfigError(UserFacingError):
    """An option has a value the trainer cannot use."""


class DatasetError(UserFacingError):
    """The image folder cannot give a usable training set."""


class ModelLoadError(UserFacingError):
    """A file is not a checkpoint we can load (wrong format, wrong family, unsafe pickle)."""


class OutputError(UserFacingError):
    """The result cannot be written where it was asked to go."""


class TrainingStopped(UserFacingError):
    """Training ended early: cancelled by the user or stopped by a non-finite loss."""
