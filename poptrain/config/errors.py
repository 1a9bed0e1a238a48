"""What a user did wrong, as :class:`ConfigError`: the file, the dotted key and the reason of every
problem (the CLI turns it into exit code 2, with no traceback)."""

from __future__ import annotations

import traceback

from pydantic import (
    ValidationError,
)


class Reason(str):
    """A problem's reason that carries the traceback of the user code that raised it (a user
    coupling's own check failing): :meth:`ConfigError.render` shows it below the problem."""

    traceback: str = ""

    @classmethod
    def of(cls, text: str, exc: BaseException, skip: int = 1) -> Reason:
        """``text``, with ``exc``'s traceback less its first ``skip`` frames (poptrain's own call)."""
        tb = exc.__traceback__
        for _ in range(skip):
            tb = tb.tb_next if tb is not None and tb.tb_next is not None else tb
        reason = cls(text)
        reason.traceback = "".join(traceback.format_exception(type(exc), exc, tb))
        return reason


class ConfigError(Exception):
    """A user-caused configuration problem: what is wrong, where, and what to do."""

    def __init__(self, problems: list[tuple[str, str]], source: str | None = None):
        self.problems = problems
        self.source = source
        super().__init__(self.render())

    def render(self) -> str:
        where = f" in {self.source}" if self.source else ""
        lines = [f"Invalid configuration{where}:"]
        for key, reason in self.problems:
            text = " ".join(str(reason).split())  # one line per problem, whatever an exception's text holds
            lines.append(f"  - {key}: {text}" if key else f"  - {text}")
            trace = getattr(reason, "traceback", "")
            if trace:  # a bug in user code: where it happened, as Python tells it
                lines.extend(f"      {line}" for line in trace.rstrip().splitlines())
        return "\n".join(lines)


def _format_loc(loc: tuple) -> str:
    return ".".join(str(part) for part in loc)


def _validation_problems(error: ValidationError, prefix: str = "") -> list[tuple[str, str]]:
    problems = []
    for item in error.errors():
        key = _format_loc(item["loc"])
        key = f"{prefix}.{key}" if prefix and key else (prefix or key)
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key (check its spelling against `poptrain schema`)"
        elif item["type"] == "missing":
            message = "required key is missing"
        problems.append((key, message))
    return problems
