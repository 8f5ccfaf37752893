"""Progress for every long phase: a tqdm bar on a terminal, periodic log lines everywhere else.

Why: fits, warm starts, exports and loads of a full-size model take minutes to hours. On a terminal
the user gets a tqdm bar; under CI, nohup, a notebook or a pipe (stderr not a TTY) tqdm's carriage
returns are useless, so the same loop emits one `logging` record every `every_s` seconds (default 20)
with count, rate and ETA, e.g.

    globe: warm start up: 320/1440 experts (22%), 1.9 experts/s, ETA 9m50s

The library logs to the "globe" logger. If neither it nor the root logger has a handler (a plain
script, a notebook), a stderr handler at INFO is attached once, as transformers does for its own
logger, so nothing runs silently; a user's own logging configuration always wins.

Usage:
    for x in track(items, "warm start up", unit="experts"): ...
    with Progress(total=n, desc="export", unit="B", scale=1e-9, unit_scale_name="GB") as bar:
        bar.update(k)
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from typing import TypeVar

from .errors import GlobeError

T = TypeVar("T")
LOGGER_NAME = "globe"
EVERY_S_ENV = "GLOBE_PROGRESS_EVERY_S"
DEFAULT_EVERY_S: float | None = None  # None: from GLOBE_PROGRESS_EVERY_S (default 20 s); tests set a number


def env_every_s() -> float:
    """Seconds between progress lines off a terminal: GLOBE_PROGRESS_EVERY_S, 20 when unset or empty.
    Raises GlobeError for a value that is not a finite number >= 0."""
    raw = os.environ.get(EVERY_S_ENV, "").strip()
    if not raw:
        return 20.0
    try:
        v = float(raw)
    except ValueError:
        v = float("nan")
    if not 0 <= v < float("inf"):
        raise GlobeError(f"{EVERY_S_ENV}={raw!r}: expected seconds between progress lines, a number >= 0")
    return v
HEARTBEAT_MAX_IDLE = 10  # a heartbeat stops after this many intervals without progress (an abandoned bar)


def get_logger() -> logging.Logger:
    """The library's logger, with a default stderr handler when nothing else would print INFO."""
    log = logging.getLogger(LOGGER_NAME)
    if not getattr(get_logger, "_done", False):
        get_logger._done = True  # type: ignore[attr-defined]
        if not log.handlers and not logging.getLogger().handlers:
            h = logging.StreamHandler(sys.stderr)
            h.setFormatter(logging.Formatter("%(asctime)s globe: %(message)s", "%H:%M:%S"))
            log.addHandler(h)
            log.setLevel(logging.INFO)
            log.propagate = False
    return log


def fmt_duration(s: float) -> str:
    """Seconds -> '45s', '9m50s', '2h05m'."""
    if s != s or s == float("inf"):
        return "?"
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class Progress:
    """Counts toward `total`; tqdm on a TTY (bar=None -> auto), else a log line every `every_s` seconds.

    scale/unit_name convert raw counts for display (e.g. bytes -> GB). Always logs one line at the
    start and one at the end (with the elapsed time) when not on a TTY, so short phases are visible too.
    quiet=True (a phase expected to take seconds) prints nothing unless it is still running after
    `every_s` seconds (a busy machine): from the first update after that it logs like a loud one,
    heartbeat and closing line included, whether or not stderr is a terminal.
    """

    def __init__(self, total: float | None, desc: str, unit: str = "it", *, bar: bool | None = None,
                 every_s: float | None = None, scale: float = 1.0, unit_name: str | None = None,
                 initial: float = 0, quiet: bool = False):
        self.total, self.desc, self.unit, self._raw_unit = total, desc, unit_name or unit, unit
        self.scale, self.n, self.initial = scale, float(initial), float(initial)
        if every_s is None:
            every_s = env_every_s() if DEFAULT_EVERY_S is None else DEFAULT_EVERY_S
        self.every_s = float(every_s)
        self.t0 = self.last = time.monotonic()
        self.quiet = quiet
        self._bar = None
        self._stop: threading.Event | None = None
        self.postfix = ""
        use_bar = is_tty() if bar is None else bar
        if quiet:
            return
        self._start(use_bar)

    def _start(self, use_bar: bool, late_s: float = 0.0) -> None:
        total, desc, unit = self.total, self.desc, self._raw_unit
        if use_bar:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total, initial=self.initial, desc=desc, unit=unit, dynamic_ncols=True,
                             unit_scale=self.scale if self.scale != 1.0 else False)
        else:
            tot = f" of {self._fmt(total)} {self.unit}" if total else ""
            ago = f" {fmt_duration(late_s)} ago" if late_s else ""  # a quiet phase revealed late says when it began
            get_logger().info("%s: started%s%s", desc, ago, tot)
            if self.every_s > 0:  # one update can take minutes (a chunk of a full-size family on a busy CPU)
                self._stop = threading.Event()
                threading.Thread(target=_heartbeat, args=(weakref.ref(self), self._stop, self.every_s),
                                 daemon=True, name=f"globe-progress-{desc}").start()

    def _fmt(self, v: float | None) -> str:
        if v is None:
            return "?"
        x = v * self.scale
        return f"{x:.0f}" if float(x).is_integer() or abs(x) >= 100 else f"{x:.2f}"

    def set_postfix(self, **kw: object) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in kw.items())
        if self._bar is not None:
            self._bar.set_postfix(**kw)

    def update(self, k: float = 1) -> None:
        self.n += k
        if self.quiet:
            if self.every_s <= 0 or time.monotonic() - self.t0 < self.every_s:
                return
            self.quiet = False  # a quiet phase that outlasted one interval: report it from here on
            self._start(False, time.monotonic() - self.t0)
            self.last = self.t0  # so the line below goes out now
        if self._bar is not None:
            self._bar.update(k)
            return
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            get_logger().info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        el = max(now - self.t0, 1e-9)
        done = self.n - self.initial
        rate = done / el
        parts = [f"{self.desc}: {self._fmt(self.n)}"]
        if self.total:
            parts[0] += f"/{self._fmt(self.total)} {self.unit} ({100 * self.n / self.total:.0f}%)"
        else:
            parts[0] += f" {self.unit}"
        parts.append(f"{rate * self.scale:.3g} {self.unit}/s")
        if self.total and rate > 0:
            parts.append(f"ETA {fmt_duration((self.total - self.n) / rate)}")
        parts.append(f"elapsed {fmt_duration(el)}")
        if self.postfix:
            parts.append(self.postfix)
        return ", ".join(parts)

    def close(self) -> None:
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            return
        if self._stop is not None:
            self._stop.set()
        if self.last is not None:
            rest = [x for x in self.line().split(", ")[1:] if not x.startswith("ETA")]
            get_logger().info("%s: done, %s", self.desc, ", ".join(rest))
            self.last = None  # type: ignore[assignment]

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _heartbeat(ref: weakref.ref, stop: threading.Event, every_s: float) -> None:
    """Log the progress line every `every_s` seconds in which `update` logged nothing, so a phase whose
    single steps are slow is never silent; ends at close(), when the Progress is collected, or after
    HEARTBEAT_MAX_IDLE intervals without any progress (a bar abandoned by an exception)."""
    idle, seen = 0, None
    while not stop.wait(every_s):
        bar = ref()
        if bar is None or bar.last is None:
            return
        idle = idle + 1 if bar.n == seen else 0
        seen = bar.n
        if idle >= HEARTBEAT_MAX_IDLE:
            return
        now = time.monotonic()
        if now - bar.last >= every_s * 0.999:
            bar.last = now
            get_logger().info("%s", bar.line(now))
        del bar


def track(items: Iterable[T], desc: str, total: float | None = None, unit: str = "it", **kw) -> Iterator[T]:
    """Iterate with progress (see `Progress`); total defaults to len(items) when it has one."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(total, desc, unit, **kw) as p:
        for x in items:
            yield x
            p.update(1)


def log(msg: str, *args: object) -> None:
    """One INFO line on the globe logger (visible by default, see the module docstring)."""
    get_logger().info(msg, *args)


BIG_PARAMS = 1e9  # above this many parameters, every forward-bound phase reports progress


def is_big(model) -> bool:
    """More than BIG_PARAMS parameters: one forward can take seconds to minutes on a CPU, so perplexity,
    speed, generate and the lru warm-up always show progress."""
    return sum(p.numel() for p in model.parameters()) > BIG_PARAMS
