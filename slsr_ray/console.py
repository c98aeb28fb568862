"""What a run prints, and where Ray's own logs go instead.

A local Ray run is loud: Ray's driver-side loggers (``ray``, ``ray.data``: start-up, Ray Data's execution
plans and progress block) and every line its workers write (Ray Train's ``TrainingReport(...)`` per epoch
per worker, actor start-up notes) reach the console. In *quiet* mode (the ``slsr`` default) all of that
goes to one log file (:func:`open_log`), and the console shows only

* the stage lines of the pipeline (:func:`status` is a transient "running" line on a terminal, nothing in
  a log; :func:`echo` prints the line a stage leaves behind),
* worker lines that carry :data:`TAG` (rank 0's epoch metrics, warnings of this package's code in
  workers: see :func:`worker_logging`), each once, prefixed with the running stage,
* errors (Ray's, and this package's warnings).

``slsr -v`` keeps everything on the console as well (the file is still written). Library use (tests,
notebooks, ``import slsr_ray``) leaves Ray's own console behaviour unless it asks for quiet mode.
"""

from __future__ import annotations

import builtins
import functools
import logging
import os
import sys
import tempfile
import threading

TAG = "[slsr] "
# ``log.info(..., extra=SHOW)`` in a worker: the quiet console shows the line (after worker_logging()).
SHOW = {"console": True}
_FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_RAY_PRINTER = "ray_print_logs"  # the name Ray gives its worker-output handler on the driver
_PRINT = builtins.print  # Ray's tqdm_ray replaces builtins.print in the driver once it prints worker output


class _LogFile(logging.Handler):
    """The run's log file; holds the records logged before its path is known (Ray's session folder
    exists only once Ray runs)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter(_FILE_FORMAT))
        self.path: str | None = None
        self._file: logging.FileHandler | None = None
        self._early: list[logging.LogRecord] = []

    def open(self, path: str) -> None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self._file = logging.FileHandler(path, mode="a", encoding="utf-8")
        self._file.setFormatter(self.formatter)
        self.path = path
        for record in self._early:
            self._file.emit(record)
        self._early.clear()

    def emit(self, record: logging.LogRecord) -> None:
        if self._file is None:
            if len(self._early) < 10_000:
                self._early.append(record)
        else:
            self._file.emit(record)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        super().close()


class _State:
    configured = False  # configure() was called (the CLI, the jobs)
    verbose = False
    routed = False  # Ray's output already goes through route_ray_output()
    log = _LogFile()
    status_text = ""  # the transient status line (terminal only)
    label = ""  # the running stage, prefixed to worker lines
    shown: set[str] = set()  # worker lines shown once
    lock = threading.RLock()


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record comes (a test runner swaps it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass

    def emit(self, record: logging.LogRecord) -> None:
        with _State.lock:  # a warning while a stage runs: not glued to the terminal's status line
            _clear_status()
            super().emit(record)
            _draw_status()


def configure(verbose: bool = False) -> None:
    """Quiet console unless ``verbose``: what ``slsr`` and the job entry points call first. This package's
    warnings (and with ``verbose`` its INFO lines) go to stderr, all of its INFO lines to the log file."""
    _State.configured, _State.verbose = True, verbose
    pkg = logging.getLogger("slsr_ray")
    pkg.setLevel(logging.INFO)
    for h in [h for h in pkg.handlers if isinstance(h, _Stderr)]:
        pkg.removeHandler(h)
    out = _Stderr()
    out.setLevel(logging.INFO if verbose else logging.WARNING)
    out.setFormatter(logging.Formatter(TAG + ("%(message)s" if verbose else "%(levelname)s: %(message)s")))
    pkg.addHandler(out)
    if _State.log not in pkg.handlers:
        pkg.addHandler(_State.log)


def configured() -> bool:
    return _State.configured


def quiet_by_default() -> bool:
    return _State.configured and not _State.verbose


def log_path() -> str | None:
    return _State.log.path


# ----------------------------------------------------------------------------- the driver's console


def _terminal() -> bool:
    return sys.stdout.isatty()


def _clear_status() -> None:
    if _State.status_text and _terminal():
        sys.stdout.write("\r\033[K")
        sys.stdout.flush()


def _draw_status() -> None:
    if _State.status_text and _terminal():
        sys.stdout.write(_State.status_text)
        sys.stdout.flush()


def _print_line(text: str) -> None:
    """``print`` a whole line, tqdm's bars (a stage's progress on stdout or stderr) cleared first and
    redrawn after: in ``ray job logs`` or a file, a bar has no newline yet, and the line would be glued
    to its end ("generating 24 images: 0%|  |[slsr] generate no CUDA: ...")."""
    from tqdm import tqdm

    with tqdm.external_write_mode(file=sys.stdout):
        print(text, flush=True)


def echo(text: str = "") -> None:
    """Print a line that stays (a finished stage, the table); it replaces the transient status line."""
    with _State.lock:
        _clear_status()
        _State.status_text = ""
        _print_line(text)


def is_console(fn) -> bool:
    """Whether ``fn`` prints to the console: :func:`echo`, or ``print`` (also as Ray patches it)."""
    return fn is echo or fn is _PRINT or fn is builtins.print


def status(text: str, label: str = "") -> None:
    """Show what runs now: on a terminal one line that the next output replaces; in a log nothing (the
    finished line says it all). Without :func:`configure` (library use) a plain line, as before."""
    with _State.lock:
        _State.label = label
        if not _State.configured:
            print(text, flush=True)
            return
        _clear_status()
        _State.status_text = text
        _draw_status()


def _show_worker_line(text: str) -> None:
    with _State.lock:
        if text in _State.shown:
            return
        _State.shown.add(text)
        _clear_status()
        label = f"{_State.label:<18} " if _State.label else ""
        _print_line(f"{TAG}{label}{text}")
        _draw_status()


# ----------------------------------------------------------------------------- routing Ray's output


class _QuietConsole(logging.Filter):
    """On Ray's console handlers: errors pass, the rest only with ``-v`` (the log file has all)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _State.verbose or record.levelno >= logging.ERROR


def _ray_loggers() -> list[logging.Logger]:
    """The loggers Ray configures with their own console handlers (``ray``; ``ray.data`` does not
    propagate to it)."""
    import ray.data  # noqa: F401  (configures the ``ray.data`` logger on import)

    names = [n for n in logging.root.manager.loggerDict if n == "ray" or n.startswith("ray.")]
    found = [logging.getLogger(n) for n in names]
    return [lg for lg in found if lg.handlers and (lg.name == "ray" or not lg.propagate)]


def open_log(path: str | None) -> None:
    """Send Ray's driver-side logs to the log file (``path``; None: decided after Ray starts)."""
    for lg in _ray_loggers():
        if _State.log not in lg.handlers:
            lg.addHandler(_State.log)
        for h in lg.handlers:
            is_console = isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
            if is_console and not any(isinstance(f, _QuietConsole) for f in h.filters):
                h.addFilter(_QuietConsole())
    if path is not None and _State.log.path is None:
        _State.log.open(path)


def route_ray_output(session_log_dir: str | None) -> None:
    """After ``ray.init``: open the log file in Ray's session folder if no path was given, print its path
    once, and pass the workers' output (Ray forwards it to the driver) through :func:`_on_worker_output`:
    all of it to the log file, tagged lines to the console."""
    if _State.log.path is None:
        folder = session_log_dir or os.path.join(tempfile.gettempdir(), "slsr-logs")
        _State.log.open(os.path.join(folder, f"slsr-ray-{os.getpid()}.log"))
    if _State.routed:
        return
    _State.routed = True
    try:  # Ray's dispatcher of worker output (not a public API): without it Ray's default printing stays
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

        printer = next((h for name, h in dispatcher.handlers if name == _RAY_PRINTER), None)
    except (ImportError, AttributeError):
        printer = None
    if printer is not None:
        dispatcher.remove_handler(_RAY_PRINTER)
        dispatcher.add_handler(_RAY_PRINTER, functools.partial(_on_worker_output, printer))
    hint = "" if _State.verbose else "  (slsr -v shows them here)"
    echo(f"{TAG}Ray logs: {_State.log.path}{hint}")


_workers_log = logging.getLogger("slsr_ray.workers")


def _on_worker_output(ray_printer, data: dict) -> None:
    """One batch of lines from one Ray worker process (or the raylet / autoscaler)."""
    who = data.get("actor_name") or data.get("task_name")
    source = f"({who} pid={data.get('pid')})" if who else f"(pid={data.get('pid')})"
    lines = data.get("lines", [])
    if data.get("pid") == "autoscaler":  # its status dumps; Ray's printer keeps only the events
        ray_printer(data)
        return
    for line in lines:
        _workers_log.info("%s %s", source, line)
    if _State.verbose or data.get("pid") == "raylet":  # node-level news: out of memory, ...
        ray_printer(data)
        return
    for line in lines:
        if line.startswith(TAG):
            _show_worker_line(line[len(TAG):])


def _attach_workers_log() -> None:
    _workers_log.propagate = False
    if _State.log not in _workers_log.handlers:
        _workers_log.addHandler(_State.log)
    _workers_log.setLevel(logging.INFO)


_attach_workers_log()


# ----------------------------------------------------------------------------- inside Ray workers


class _TagFormatter(logging.Formatter):
    """Warnings and records logged with ``extra=SHOW`` start with :data:`TAG`, every line of them."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if getattr(record, "console", False) or record.levelno >= logging.WARNING:
            return "\n".join(TAG + line for line in text.splitlines())
        return text


def worker_logging() -> None:
    """Call at the start of code that runs in a Ray worker: this package's INFO records go to the worker's
    stderr (Ray forwards it to the driver), the ones for the console tagged. They do not propagate to the
    root logger, which Ray Train configures in its workers to print them once more without the tag."""
    pkg = logging.getLogger("slsr_ray")
    if any(isinstance(h.formatter, _TagFormatter) for h in pkg.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_TagFormatter("%(message)s"))
    pkg.addHandler(handler)
    pkg.setLevel(logging.INFO)
    pkg.propagate = False
