"""Typed errors: each carries the exit code and a one-paragraph hint. Only the CLI prints them."""

from __future__ import annotations


class ExitCode:
    """Exit codes, the same for every command (documented in the README)."""

    OK = 0
    CHECK_FAILED = 1
    USAGE = 2
    INPUT_REJECTED = 3
    RESULT_INVALID = 4
    OUT_OF_RESOURCES = 5
    INTERRUPTED = 130  # Ctrl-C (SIGINT)
    TERMINATED = 143  # SIGTERM: 128 + 15, as a shell reports a process ended by it


class LlmoptError(Exception):
    """Base class: a message saying what was wrong and a hint saying how to fix it."""

    exit_code: int = 1
    title: str = "Error"

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} {self.hint}"


class RecipeError(LlmoptError):
    """The recipe or the command line is invalid."""

    exit_code = ExitCode.USAGE
    title = "Recipe error"


class InputError(LlmoptError):
    """A model, checkpoint or data file was rejected."""

    exit_code = ExitCode.INPUT_REJECTED
    title = "Input rejected"


class ResultValidationError(LlmoptError):
    """The exported artifact does not reproduce the optimized model."""

    exit_code = ExitCode.RESULT_INVALID
    title = "Result validation failed"


class ResourceError(LlmoptError):
    """Not enough memory or disk."""

    exit_code = ExitCode.OUT_OF_RESOURCES
    title = "Out of resources"


class ChecksFailed(LlmoptError):
    """One or more quality gates of the recipe's `checks:` failed (the artifact is still written)."""

    exit_code = ExitCode.CHECK_FAILED
    title = "Quality checks failed"
