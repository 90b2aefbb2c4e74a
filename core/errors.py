"""Typed errors: each carries the exit code and a one-paragraph hint. Only the CLI prints them."""

from __future__ import annotations

import errno as _errno


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


# ------------------------------------------------------------------------------------------ translation table
# Libraries signal a full disk, an unreadable file or a damaged input in their own types (safetensors'
# SafetensorError, onnx's bare Exception on a failed save, protobuf's DecodeError, OSError by errno, ...). One
# table turns each into llmopt's typed error, so no environment failure or user mistake reaches the "internal
# error" path; what no row matches stays a bug (exit 70).

_DISK_FULL_ERRNOS = {_errno.ENOSPC, _errno.EDQUOT, _errno.EFBIG}
# How libraries that drop the errno (safetensors, onnx's external-data writer, tokenizers) still say it.
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "os error 28", "File too large")
_PATH_ERRNOS = {_errno.EACCES: "permission denied", _errno.EPERM: "operation not permitted",
                _errno.EROFS: "read-only file system", _errno.ENOENT: "no such file or folder",
                _errno.ENOTDIR: "a part of the path is not a folder", _errno.EISDIR: "it is a folder",
                _errno.ENAMETOOLONG: "the name is too long", _errno.ELOOP: "too many symbolic links",
                _errno.EEXIST: "it already exists", _errno.ENOTEMPTY: "the folder is not empty",
                _errno.EXDEV: "it is on another file system"}
_FREE_SPACE = "Free space next to --output and in the temp folder (TMPDIR), or choose another --output."


def translate(exc: BaseException) -> LlmoptError | None:
    """llmopt's typed error for a library or system exception, or None when it is a bug of llmopt's."""
    if isinstance(exc, LlmoptError):
        return exc
    text = str(exc)
    if isinstance(exc, MemoryError) or (isinstance(exc, OSError) and exc.errno == _errno.ENOMEM):
        return ResourceError("Ran out of memory; nothing was written.",
                             "Free memory or use a machine with more RAM; a smaller `evaluation.max_tokens` or "
                             "`calibration.samples` also lowers the peak.")
    if (isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS) or any(t in text for t in _DISK_FULL_TEXT):
        where = getattr(exc, "filename", None)
        return ResourceError(f"The disk is full{f' ({where})' if where else ''}; nothing was written.", _FREE_SPACE)
    if isinstance(exc, OSError) and exc.errno == _errno.EIO:
        return ResourceError(f"The file system reported an I/O error ({exc.filename or text}); nothing was written.",
                             "Check the disk (dmesg) or choose another --output.")
    if isinstance(exc, OSError) and exc.errno in _PATH_ERRNOS:
        where = exc.filename or text
        return RecipeError(f"Cannot use '{where}': {_PATH_ERRNOS[exc.errno]}.",
                           "Check the path and its permissions, or choose another one.")
    if isinstance(exc, RecursionError):
        return InputError("An input is nested too deeply to read (thousands of levels of JSON or YAML).",
                          "Check that the file is what it claims to be: reports, manifests and configs are shallow.")
    if isinstance(exc, UnicodeDecodeError):
        return InputError(f"An input file is not UTF-8 text ({exc.reason} at byte {exc.start}).",
                          "Give a UTF-8 text file.")
    kind = f"{type(exc).__module__}.{type(exc).__name__}"
    if kind.startswith("safetensors") or type(exc).__name__ == "SafetensorError":
        return InputError(f"safetensors refused a file: {text}.", "Re-download or re-save the checkpoint.")
    if kind.startswith("google.protobuf") and "DecodeError" in kind:
        return InputError(f"An ONNX file could not be parsed ({text}).", "The file is damaged; rebuild it.")
    return None
