"""The project's error types share one base, :class:`SlsrError`: an error the user can fix (bad input,
missing file, unreachable storage), as opposed to a bug. Every CLI command and job entry point turns it
into one line ``error: <what> (<file or key>): <what was expected>`` on stderr and exit status 2; the
traceback is shown only with ``-v`` / ``--verbose`` (see :func:`report_error`).

Errors raised with one message string keep it as their text; the structured form
``SlsrError(what, where=..., expected=...)`` builds the standard line.
"""

from __future__ import annotations

import contextlib
import sys
import traceback
from collections.abc import Iterator

EXIT_USER_ERROR = 2


class SlsrError(Exception):
    """Base class of every error a user can fix by changing the input."""

    def __init__(self, what: str, where: str | None = None, expected: str | None = None):
        self.what, self.where, self.expected = what, where, expected
        text = what
        if where:
            text += f" ({where})"
        if expected:
            text += f": {expected}" if expected.startswith("expected") else f": expected {expected}"
        super().__init__(text)


def root_error(exc: BaseException) -> BaseException:
    """The user error behind ``exc``: Ray wraps errors raised in tasks, actors and Train workers
    (``RayTaskError.cause``, ``__cause__`` chains); the first :class:`SlsrError` found wins."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, SlsrError) and not _is_ray_wrapper(e):
            return e
        todo += [getattr(e, "cause", None), getattr(e, "controller_failure", None), e.__cause__, e.__context__]
        todo += list((getattr(e, "worker_failures", None) or {}).values())  # Ray Train's WorkerGroupError
    return exc


def _is_ray_wrapper(e: BaseException) -> bool:
    # Ray re-raises a task's error as a subclass of both RayTaskError and the error's own class,
    # with the remote traceback in its text: unwrap it to the original error.
    return any(c.__name__ in ("RayTaskError", "RayActorError") for c in type(e).__mro__)


def one_line(exc: BaseException) -> str:
    """``error: <message>`` on one line (a message's later lines are joined with ' | ')."""
    text = " | ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())
    return f"error: {text or type(exc).__name__}"


def report_error(exc: BaseException, verbose: bool = False, stream=None) -> int:
    """Print ``exc`` the one way every entry point does and return the exit status (2)."""
    stream = stream or sys.stderr
    if verbose:
        traceback.print_exception(exc, file=stream)
    print(one_line(root_error(exc)), file=stream)
    return EXIT_USER_ERROR


def is_user_error(exc: BaseException) -> bool:
    return isinstance(root_error(exc), SlsrError)


def check_option(ok: bool, flag: str, expected: str, got: object) -> None:
    """Raise a ConfigError ``invalid value (<flag>): expected <expected>, got <got>`` unless ``ok``."""
    if not ok:
        from .config import ConfigError

        raise ConfigError("invalid value", where=flag, expected=f"expected {expected}, got {got!r}")


@contextlib.contextmanager
def as_config_error(where: str | None = None) -> Iterator[None]:
    """Turn the ValueError a settings object raises for a bad value into a ConfigError (a user error)."""
    from .config import ConfigError

    try:
        yield
    except SlsrError:
        raise
    except ValueError as e:
        raise ConfigError(str(e), where=where) from e
