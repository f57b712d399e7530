"""Everything `form` prints: results, tables, fields, progress, notes, errors and --json.

stdout carries only what was asked for: a table, a record's fields, a one-line result, or with
--json one JSON document (its bytes are an interface: scripts parse them). Notes, progress and
errors go to stderr, one line each, "form: ..." and "form: error: ...".

Tables and fields are laid out by rich: in a terminal, bold headers and cells wrapped (ids folded,
never cut) to the terminal's width; piped or redirected, plain text at its natural width (columns
two spaces apart, no trailing blanks), so that `grep` and `cut` see whole rows. Progress (a
spinner, a bar of build steps, the time spent) shows only in a terminal, above nothing: the notes
and log lines printed meanwhile scroll above it.
"""

from __future__ import annotations

import io
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
_PLAIN_WIDTH = 100_000  # "no wrapping" for output that is not a terminal
_SHORT = 20  # a column this wide at most is never wrapped in a terminal

Column = tuple[str, Callable[[dict], Any]]  # a header and what a row shows under it


class CliError(Exception):
    """A failure to report as one line "form: error: <message>", exiting with `code`."""

    def __init__(self, message: str, code: int = EXIT_FAILURE):
        super().__init__(message)
        self.message = message
        self.code = code


# ---- stderr ------------------------------------------------------------------------------------


def note(message: str) -> None:
    # Notes go to stderr so that stdout stays exactly the requested output (e.g. --json).
    print(f"form: {message}", file=sys.stderr, flush=True)


def error(message: str) -> None:
    print(f"form: error: {message}", file=sys.stderr, flush=True)


def log_lines(lines: list[str], prefix: str = "") -> None:
    """Lines of a log or of a program's output on stderr, as they are (with `prefix`)."""
    for line in lines:
        print(f"{prefix}{line}", file=sys.stderr)
    sys.stderr.flush()


class _Bar:
    def __init__(self, progress: Progress | None = None, task: Any = None):
        self._progress, self._task = progress, task

    def update(self, description: str | None = None, *, completed: int | None = None,
               total: int | None = None) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=description, completed=completed,
                                  total=total)


@contextmanager
def progress(description: str, *, total: int | None = None, enabled: bool = True) -> Iterator[_Bar]:
    """A live line on stderr while something runs: spinner, description, a bar when `total` is
    known (steps done of total), time spent. Only in a terminal, and gone when the block ends;
    `note` and `log_lines` inside the block print above it."""
    console = _console(sys.stderr)
    if not enabled or not console.is_terminal:
        yield _Bar()
        return
    bar = Progress(SpinnerColumn(), TextColumn("{task.description}", markup=False), BarColumn(),
                   MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=True)
    with bar:
        yield _Bar(bar, bar.add_task(description, total=total))


# ---- stdout ------------------------------------------------------------------------------------


def print_json(data: Any, *, indent: int | None = 2) -> None:
    """The --json document: the user commands print it indented, `form node`, `form key` and
    `form pack validate` as one line (indent=None); both byte for byte as scripts expect."""
    print(json.dumps(data, indent=indent), flush=True)


def result(text: str) -> None:
    """A command's one-line result (an id, an address, "created ...")."""
    print(text, flush=True)


def write_text(text: str) -> None:
    """Text as it came (a console, a log), ending with a newline."""
    sys.stdout.write(text if not text or text.endswith("\n") else text + "\n")
    sys.stdout.flush()


def report_write(json_mode: bool, res: Any, text: str) -> int:
    """What a write prints: its answer with --json, else `text` and the op's id."""
    if json_mode:
        print_json(res)
    else:
        op = res.get("op_id", "") if isinstance(res, dict) else ""
        result(f"{text} (op {op[:16]})" if op else text)
    return EXIT_OK


def table(rows: list[dict], columns: list[Column], empty: str) -> None:
    """One line per row under a header line; `empty` alone when there are no rows.

    In a terminal too narrow for the table, the long columns (ids, addresses) fold over several
    lines, the short ones stay whole, and a blank line separates the rows."""
    if not rows:
        result(empty)
        return
    cells = [[cell(fn(row)) for _, fn in columns] for row in rows]
    widths = [max(_width(header), *(_width(row[i]) for row in cells))
              for i, (header, _) in enumerate(columns)]
    console = _console(sys.stdout)
    terminal = console.is_terminal
    fits = sum(widths) + 2 * (len(widths) - 1) <= console.width
    # columns two spaces apart: padding on both sides, or on the right and the box's divider
    t = Table(box=box.SIMPLE_HEAD if terminal else None, padding=(0, 1, 0, 0) if terminal else (0, 1),
              show_edge=False, pad_edge=False, header_style="bold", show_lines=terminal and not fits,
              highlight=False)
    for (header, _), width in zip(columns, widths, strict=True):
        t.add_column(Text(header), overflow="fold", no_wrap=width <= _SHORT)
    for row in cells:  # Text: a value is never read as rich markup
        t.add_row(*map(Text, row))
    _emit(t, console)


def listing(json_mode: bool, res: dict, field: str, columns: list[Column], empty: str) -> int:
    """A list answer: whole with --json, else its `field` (the rows) as a table."""
    if json_mode:
        print_json(res)
    else:
        table(res.get(field) or [], columns, empty)
    return EXIT_OK


def fields(pairs: list[tuple[str, Any]]) -> None:
    """Name and value, one pair per line, the values aligned."""
    t = Table.grid(padding=(0, 2))
    t.add_column(style="bold", no_wrap=True)
    t.add_column(overflow="fold")
    for name, value in pairs:
        t.add_row(Text(name), Text(cell(value)))
    _emit(t, _console(sys.stdout))


def record(rec: dict) -> None:
    """A record's fields as the node sent them, times (..._at) also in UTC."""
    fields([(k, f"{iso(v)} ({v})" if k.endswith("_at") and isinstance(v, int) and v > 0 else v)
            for k, v in rec.items()])


def show_record(json_mode: bool, rec: dict) -> int:
    """A record read from the node: as it came with --json, else its fields."""
    if json_mode:
        print_json(rec)
    else:
        record(rec)
    return EXIT_OK


def blank() -> None:
    print(flush=True)


def _console(stream: Any) -> Console:
    """A rich console on `stream`, a terminal's only when the stream is one: FORCE_COLOR or
    TTY_COMPATIBLE in the environment must not put colours and line breaks into piped output."""
    try:
        tty = bool(stream.isatty())
    except (AttributeError, ValueError):  # replaced or closed
        tty = False
    return Console(file=stream, force_terminal=tty, highlight=False, emoji=False)


def _width(text: str) -> int:
    return max(map(cell_len, text.splitlines() or [""]))


def _emit(renderable: Any, console: Console) -> None:
    if console.is_terminal:
        console.print(renderable)
        return
    plain = Console(file=io.StringIO(), width=_PLAIN_WIDTH, color_system=None, highlight=False,
                    emoji=False)
    with plain.capture() as captured:
        plain.print(renderable)
    sys.stdout.write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))
    sys.stdout.flush()


# ---- how values read ---------------------------------------------------------------------------


def cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, list):
        return ",".join(cell(x) for x in v) if all(not isinstance(x, dict | list) for x in v) \
            else json.dumps(v, separators=(",", ":"))
    if isinstance(v, dict):
        return json.dumps(v, separators=(",", ":")) if v else "-"
    return str(v)


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def short(addr: Any) -> str:
    """An address as 0x1234…abcd (ids and other values as they are)."""
    return f"{addr[:6]}…{addr[-4:]}" if isinstance(addr, str) and len(addr) == 42 else cell(addr)


def ago(ms: Any) -> str:
    if not isinstance(ms, int) or ms <= 0:
        return "never"
    s = max(0, int(time.time() - ms / 1000))
    if s < 120:
        return f"{s}s ago"
    if s < 7200:
        return f"{s // 60}m ago"
    return f"{s // 3600}h ago"


def when(ms: int) -> str:
    """A unix-ms time as UTC, to the minute."""
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M UTC")


def size(n: int) -> str:
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KiB" if n >= 1024 else f"{n} bytes"
    return f"{n / (1024 * 1024):.1f} MiB".replace(".0 MiB", " MiB")
