"""The steps as printed: one numbered line each, and the one error line a failing step becomes."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator

from formation.cli.output import EXIT_FAILURE, EXIT_USAGE, CliError
from formation.keystore import KeystoreError
from formation.node.checks import ConfigError
from formation.node.fog import InviteError
from formation.node.setup import NodeError


class JoinError(Exception):
    """A step that cannot go on: why, what to do about it, and the exit code."""

    def __init__(self, why: str, fix: str = "", code: int = EXIT_FAILURE):
        super().__init__(why)
        self.why, self.fix, self.code = why, fix, code


class Step:
    def __init__(self):
        self.status = "ok"
        self.detail = ""
        self.printed = False

    def ok(self, detail: str) -> None:
        self.status, self.detail = "ok", detail

    def done(self, detail: str) -> None:
        """Done by an earlier run (or not needed): nothing changed."""
        self.status, self.detail = "done", detail

    def skip(self, detail: str) -> None:
        self.status, self.detail = "none", detail


class Steps:
    """Numbered step lines on stdout (the command's report; --json: one object per line). A step
    that raises prints FAILED and becomes one CliError: the step, why, what to do, and the
    command to retry (`retry`, the token shown as TOKEN)."""

    def __init__(self, names: list[str], *, json_mode: bool = False, retry: str = "",
                 emit: Callable[[str], None] | None = None):
        self.names = names
        self.json = json_mode
        self.retry = retry
        self.emit = emit or (lambda line: print(line, flush=True))
        self.printed: list[tuple[str, str, str]] = []  # (name, status, detail)

    def _line(self, name: str, status: str, detail: str) -> None:
        self.printed.append((name, status, detail))
        i = self.names.index(name) + 1
        if self.json:
            self.emit(json.dumps({"step": i, "of": len(self.names), "name": name, "status": status,
                                  "detail": detail}))
        else:
            self.emit(f"[{i}/{len(self.names)}] {name:<13} {status:<6} {detail}".rstrip())

    def finish(self, name: str, st: Step) -> None:
        """Print the step's line now (a step that goes on after it has succeeded: the node)."""
        if not st.printed:
            st.printed = True
            self._line(name, st.status, st.detail)

    def failure(self, name: str, exc: BaseException) -> CliError | None:
        """Print the step as FAILED; the one-line error for `exc` (None: not ours, a bug)."""
        retry = self.retry
        if isinstance(exc, JoinError):
            why, fix, code = exc.why, exc.fix, exc.code
        elif isinstance(exc, InviteError):  # the token cannot be used again: a new one can
            why, fix, code = str(exc), "", EXIT_FAILURE
            retry = retry.replace("TOKEN", "NEW_TOKEN", 1)
        elif isinstance(exc, KeystoreError | NodeError):
            why, fix, code = str(exc), "", EXIT_FAILURE
        elif isinstance(exc, ConfigError):
            why, fix, code = str(exc), "", EXIT_USAGE
        elif isinstance(exc, CliError):
            why, fix, code = exc.message, "", exc.code
        else:
            self._line(name, "FAILED", f"{type(exc).__name__}: {exc}")
            return None
        self._line(name, "FAILED", why)
        text = f"{name}: {why}" + (f"; {fix}" if fix else "")
        return CliError(text + (f" (retry: {retry})" if retry else ""), code)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[Step]:
        st = Step()
        try:
            yield st
        except Exception as exc:
            err = self.failure(name, exc)
            if err is None:
                raise
            raise err from None
        self.finish(name, st)
