"""One error type for the whole project. It carries where the problem is (file, line, field) and how to fix it,
so the CLI can print a single line and exit with code 2."""
from __future__ import annotations


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception as one short line: its type and the first non-empty line of its message."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    text = text if len(text) <= limit else text[:limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class StackError(Exception):
    def __init__(self, message: str, *, file=None, line: int | None = None, field: str | None = None,
                 hint: str | None = None):
        super().__init__(message)
        self.message, self.file, self.line, self.field, self.hint = message, file, line, field, hint

    def location(self) -> str:
        parts = []
        if self.file is not None:
            parts.append(f"{self.file}:{self.line}" if self.line is not None else str(self.file))
        if self.field:
            parts.append(f"field '{self.field}'")
        return ": ".join(parts)

    def __str__(self) -> str:
        loc = self.location()
        text = f"{loc}: {self.message}" if loc else self.message
        return f"{text} ({self.hint})" if self.hint else text


class ConfigError(StackError):
    """A configuration value is wrong."""


class DataError(StackError):
    """A dataset file or row is wrong."""


class ArtifactError(StackError):
    """An artifact folder is missing or incomplete."""


class CompressError(StackError):
    """A compression step failed a check (e.g. ONNX parity) or cannot handle the model."""


class StackWarning(UserWarning):
    """A problem the user must hear about that does not stop the run (e.g. poor settings); always shown."""


class ManyErrors(StackError):
    """Validation collects every problem and raises once."""

    def __init__(self, errors: list[StackError], what: str = "problems"):
        self.errors = errors
        super().__init__(f"{len(errors)} {what}")

    def __str__(self) -> str:
        if len(self.errors) == 1:
            return str(self.errors[0])
        shown = [f"  - {e}" for e in self.errors[:20]]
        more = [f"  ... and {len(self.errors) - 20} more"] if len(self.errors) > 20 else []
        return "\n".join([f"{len(self.errors)} problems:"] + shown + more)


def collect(errors: list[StackError], what: str = "problems") -> None:
    """Raise once with all collected errors, if any."""
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise ManyErrors(errors, what)
