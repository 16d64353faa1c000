"""Progress of long steps: one facility for every command, its library loops and its worker processes.

Library code reports through three calls that cost one global lookup when nobody listens:

    with progress.step("tracing 40 facts"):           # a named long step: its start, end and time
        progress.status(f"rows {done}/{total}")       # the current state inside it (throttled)
        progress.note("epoch 5: cloze recall 0.71")  # a line worth keeping (always shown)

A command shows them with a `Reporter` (activated by `mechedit.cli`): on a terminal, a rich spinner
line with the current step, status and elapsed time; otherwise (a log) plain lines stamped with the
clock and the seconds since the command started, a status line at most every `every` seconds per
source, and a heartbeat naming the steps in progress and their elapsed time whenever nothing was
printed for `heartbeat` seconds -- so a log is never silent for long, even inside one long call.

Worker processes (the cases of `mechedit run`) activate a `ChannelSink` that sends their events,
tagged with the case id, through a queue (a multiprocessing queue for the local pool, a Ray queue for
Ray); the executor hands them to the command's sink with `forward`. Progress never goes into a
result file: case files stay byte-identical whatever was shown.
"""
from __future__ import annotations

import contextlib
import sys
import threading
import time
from typing import Any, Iterator, Protocol


class Sink(Protocol):
    def emit(self, kind: str, text: str, key: str | None = None) -> None:
        """kind: "begin" / "begin_open" / "begin_quiet" (a step starts, text = its name; see
        `BEGIN_KINDS`: whether its start and its end are printed), "end" (the innermost step of
        `key` ends), "abort" (it ends by an exception: no end line), "status" (the current state), "note" (a line to keep)."""


_SINK: Sink | None = None


def active() -> bool:
    """Whether anybody listens (loops may skip formatting a status when not)."""
    return _SINK is not None


def status(text: str) -> None:
    """The current state of the long step in progress (shown throttled; the heartbeat repeats it)."""
    if _SINK is not None:
        _SINK.emit("status", text)


def note(text: str) -> None:
    """A line worth keeping in the log (always shown)."""
    if _SINK is not None:
        _SINK.emit("note", text)


BEGIN_KINDS = {"begin": (True, True), "begin_open": (True, False), "begin_quiet": (False, False)}


@contextlib.contextmanager
def step(name: str, *, quiet: bool = False, end_line: bool = True) -> Iterator[None]:
    """A named long step: a line when it starts and one with its time when it ends. `quiet`: no
    lines, it only names the context of statuses and heartbeats; `end_line=False`: no end line
    (the caller prints its own, e.g. the run's "case ... written")."""
    if _SINK is None:
        yield
        return
    sink = _SINK
    sink.emit("begin_quiet" if quiet else "begin" if end_line else "begin_open", name)
    try:
        yield
    except BaseException:
        sink.emit("abort", "")  # no "done" line: the error says what happened
        raise
    sink.emit("end", "")


@contextlib.contextmanager
def activate(sink: Sink | None) -> Iterator[Sink | None]:
    """Send this process's progress to `sink` inside the block (None: nowhere)."""
    global _SINK
    old, _SINK = _SINK, sink
    try:
        yield sink
    finally:
        _SINK = old


def forward(event: tuple) -> None:
    """Hand an event received from a worker (`ChannelSink`) to this process's sink."""
    if _SINK is not None:
        kind, text, key = event[:3]
        _SINK.emit(kind, text, key)


class ChannelSink:
    """A worker's sink: events go to `channel.put((kind, text, key))`, statuses at most every
    `every` seconds (the parent shows them throttled anyway), tagged with `key` (the case id)."""

    def __init__(self, channel: Any, key: str, every: float = 1.0):
        self.channel, self.key, self.every = channel, key, every
        self._last = 0.0
        self._pending: str | None = None

    def emit(self, kind: str, text: str, key: str | None = None) -> None:
        now = time.monotonic()
        if kind == "status" and now - self._last < self.every:
            self._pending = text
            return
        if kind == "status":
            self._last = now
        self._pending = None
        try:
            self.channel.put((kind, text, key or self.key))
        except Exception:  # a closed channel (the parent is gone or shutting down): progress is never fatal
            pass


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s} s" if s < 120 else f"{s // 60} min {s % 60:02d} s"


class Reporter:
    """A command's sink: plain timestamped lines (a log) or a rich spinner (a terminal).

    Per source (`key`: None for the command itself, a case id for a worker) it keeps the stack of
    steps in progress and the latest status. Plain mode prints each step's start (once it has run
    `delay` seconds or prints something inside: a step that fails at once leaves no line) and end
    with its time, every note, a status when nothing was printed for `every` seconds, and, from a background
    thread, a heartbeat line (every step in progress, its status and elapsed time) when nothing was
    printed for `heartbeat` seconds.
    """

    def __init__(self, stream=None, *, rich: bool | None = None, every: float = 10.0, heartbeat: float = 20.0,
                 delay: float = 3.0):
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", lambda: False)
        self.rich = bool(isatty()) if rich is None else rich
        self.every, self.heartbeat, self.delay = every, heartbeat, delay
        self.t0 = time.monotonic()
        self._lock = threading.RLock()
        self._steps: dict[str | None, list[tuple[str, float, bool]]] = {}  # key -> [(name, start, end line)]
        self._status: dict[str | None, str] = {}
        self._pending: dict[str | None, int] = {}  # key -> index in its stack of a step whose start is not printed yet
        self._last_output = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._console = self._live = None

    # ---- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> "Reporter":
        if self.rich:
            from rich.console import Console

            self._console = Console(file=self.stream)
        self._thread = threading.Thread(target=self._beat, name="mechedit-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        with self._lock:
            self._show_spinner(False)

    # ---- events ------------------------------------------------------------------------------
    def emit(self, kind: str, text: str, key: str | None = None) -> None:
        now = time.monotonic()
        with self._lock:
            stack = self._steps.setdefault(key, [])
            if kind in BEGIN_KINDS:
                start_line, end_line = BEGIN_KINDS[kind]
                self._flush_starts(key)
                stack.append((text, now, end_line))
                self._status.pop(key, None)
                if start_line:
                    self._pending[key] = len(stack) - 1  # printed once it lasts `delay` s or prints inside
            elif kind in ("end", "abort"):
                if stack:
                    if kind == "end":
                        self._flush_starts(key)
                    elif self._pending.get(key) == len(stack) - 1:
                        del self._pending[key]  # a step that failed at once (bad input): no lines at all
                    name, t, end_line = stack.pop()
                    self._status.pop(key, None)
                    if end_line and kind == "end":
                        self._line(self._where(key, stack) + f"{name}: done in {_fmt_seconds(now - t)}")
                if not stack:
                    self._steps.pop(key, None)
            elif kind == "note":
                self._flush_starts(key)
                self._line(self._where(key, stack) + text)
            elif kind == "status":
                self._status[key] = text
                if self.rich:
                    self._refresh()
                elif now - self._last_output >= self.every:
                    self._flush_starts(key)
                    self._line(self._where(key, stack) + text)
            if self.rich:
                self._show_spinner(any(self._steps.values()))
                self._refresh()

    def say(self, text: str) -> None:
        """A line from the command itself (what `note` does from library code)."""
        self.emit("note", text)

    # ---- output ------------------------------------------------------------------------------
    def _flush_starts(self, key: str | None, older_than: float | None = None) -> None:
        """Print the start line of `key`'s innermost step if it is still pending (a step's start is
        held back `delay` seconds, so that a command failing at once on bad input prints only its error)."""
        i = self._pending.get(key)
        stack = self._steps.get(key) or []
        if i is None or i >= len(stack):
            self._pending.pop(key, None)
            return
        if older_than is not None and time.monotonic() - stack[i][1] < older_than:
            return
        del self._pending[key]
        self._line(self._where(key, stack[:i]) + f"{stack[i][0]} ...")

    @staticmethod
    def _where(key: str | None, stack: list) -> str:
        names = ([f"case {key}"] if key is not None else []) + [s[0] for s in stack]
        return "".join(f"{n} > " for n in names)

    def _stamp(self) -> str:
        return f"[{time.strftime('%H:%M:%S')} {_fmt_seconds(time.monotonic() - self.t0):>9}]"

    def _line(self, text: str) -> None:
        self._last_output = time.monotonic()
        if self.rich:
            from rich.markup import escape

            self._console.print(f"[dim]{self._stamp()}[/dim] {escape(text)}", highlight=False, soft_wrap=True)
            return
        try:
            self.stream.write(f"{self._stamp()} {text}\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: progress is never fatal
            pass

    def _summary(self) -> str:
        now = time.monotonic()
        parts = []
        for key, stack in self._steps.items():
            if not stack:
                continue
            where = self._where(key, stack).removesuffix(" > ")
            st = self._status.get(key)
            times = f"{_fmt_seconds(now - stack[-1][1])}"
            if len(stack) > 1:
                times += f" in this step, {_fmt_seconds(now - stack[0][1])} in all"
            parts.append(f"{where}{': ' + st if st else ''} ({times})")
        return "; ".join(parts)

    def _show_spinner(self, on: bool) -> None:
        """The terminal's spinner line, shown only while a step runs (so results printed on stdout
        after the steps never mix with it); it leaves no trace on the screen."""
        if on and self._live is None:
            from rich.live import Live
            from rich.spinner import Spinner

            self._live = Live(Spinner("dots", ""), console=self._console, transient=True, refresh_per_second=4,
                              redirect_stdout=False, redirect_stderr=False)
            self._live.start()
        elif not on and self._live is not None:
            self._live.stop()
            self._live = None

    def _refresh(self) -> None:
        if self._live is not None:
            from rich.spinner import Spinner
            from rich.text import Text

            self._live.update(Spinner("dots", Text(self._summary() or "working")))

    def _beat(self) -> None:
        while not self._stop.wait(min(1.0, self.delay)):
            with self._lock:
                for key in list(self._pending):
                    self._flush_starts(key, older_than=self.delay)
                if self.rich:
                    self._refresh()
                elif time.monotonic() - self._last_output >= self.heartbeat:
                    summary = self._summary()
                    if summary:
                        self._line(f"still running: {summary}")
