"""The `mixtral-jax` command: one module per subcommand, each with `register(subparsers)`.

Every subcommand module in this package is discovered and registered; heavy imports happen inside `run`.
What a user can get wrong ends in one line on stderr and a non-zero exit, never a traceback (`--debug`, before
or after the subcommand, shows it): bad options (exit 2, at parse time), `MixtralError`s and write failures
(exit 1), running out of device memory (exit 1, naming what to lower), Ctrl-C (exit 130) and a reader that
closed the pipe (exit 141, silently, as Unix tools do).

Standard output carries the program's output only: file descriptor 1 is pointed at /dev/null (stderr with
`--debug`) while a command runs, so what libraries print there themselves (Gloo's connection reports in a
multi-process run) cannot mix into it, and Python's `sys.stdout` writes to the real standard output.
Without `--debug`, what libraries log themselves (JAX, Orbax through absl and asyncio, XLA's C++ warnings) is
silenced too.
"""

from __future__ import annotations

import _thread
import argparse
import contextlib
import os
import signal
import sys
from typing import Iterator

from mixtral_jax.errors import MixtralError

INTERRUPTED, BROKEN_PIPE = 130, 141  # 128 + SIGINT, 128 + SIGPIPE: the exits of a process those signals end


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + error
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    import importlib
    import pkgutil

    parser = _Parser(prog="mixtral-jax", description="Mixtral mixture-of-experts models in JAX.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and the libraries' own logs")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}").register(sub)
    for command in sub.choices.values():  # `--debug` after the subcommand too; SUPPRESS keeps one given before
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show tracebacks and the libraries' own logs")
    return parser


def main(argv: list[str] | None = None) -> int:
    name, debug = "mixtral-jax", False
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        name, debug = f"mixtral-jax {args.command}", args.debug
        sys.unraisablehook = _unraisable_debug if debug else _unraisable
        _quiet_libraries(debug)
        _import_jax_holding_interrupts()
        with _output_only_on_stdout(debug):
            return args.run(args) or 0
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except BrokenPipeError:
        return BROKEN_PIPE
    except Exception as e:
        if _interrupted(e):
            print(f"{name}: interrupted", file=sys.stderr)
            return INTERRUPTED
        message = None if debug else _message(e, getattr(args, "oom_hint", None))
        if message is None:
            raise
        print(f"{name}: error: {message}", file=sys.stderr)
        return 1


def entry() -> None:
    """The console script: `main`, then, after Ctrl-C, an exit that skips the interpreter's teardown (JAX's
    runtime threads may still be running the interrupted program, and tearing down under them can crash)."""
    code = main()
    if code == INTERRUPTED:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _import_jax_holding_interrupts() -> None:
    """Import JAX with Ctrl-C held until the import is done, then delivered: a KeyboardInterrupt raised while
    jaxlib's extension modules initialise can leave them half made, and the process then dies of a
    segmentation fault instead of ending quietly."""
    held: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        import jax  # noqa: F401
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        raise KeyboardInterrupt


def _interrupted(e: BaseException) -> bool:
    """Whether `e` was raised because of a Ctrl-C: a library that catches the KeyboardInterrupt and raises its
    own error from it (Python's dataclass machinery does, when the Ctrl-C lands in a module being imported)."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def _unraisable(unraisable) -> None:
    """Exceptions Python ignores (raised in a garbage-collector callback, a finaliser, a library's callback
    thread) cannot change what a command does, so they are not shown without `--debug` (Orbax's tensorstore
    callbacks raise "Event loop is closed" after a failed write). A Ctrl-C that lands there is delivered to the
    main thread again a moment later, outside that callback, instead of being lost."""
    if issubclass(unraisable.exc_type, KeyboardInterrupt):
        import threading

        threading.Timer(0.01, _thread.interrupt_main).start()


def _unraisable_debug(unraisable) -> None:
    """`_unraisable`, showing the others as Python does."""
    _unraisable(unraisable)
    if not issubclass(unraisable.exc_type, KeyboardInterrupt):
        sys.__unraisablehook__(unraisable)


def _message(e: Exception, oom_hint: str | None) -> str | None:
    """The one-line message of an error a user can cause or fix; None for a bug (shown as a traceback)."""
    if isinstance(e, MixtralError):
        return str(e)
    if isinstance(e, OSError):  # a write the system refused: no room, no permission, a file in the way
        return f"{e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}"
    if "RESOURCE_EXHAUSTED" in str(e) and type(e).__name__ in ("JaxRuntimeError", "XlaRuntimeError"):
        return "out of device memory" + (f": {oom_hint}" if oom_hint else "")
    return None


def _quiet_libraries(debug: bool) -> None:
    """Silence what libraries log themselves (JAX's and Orbax's Python logs, XLA's C++ log) unless `debug`:
    their errors reach the command as exceptions, which it reports in one line."""
    import logging

    if debug:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # read when jaxlib loads, which happens later
    for name in ("jax", "absl", "asyncio"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


@contextlib.contextmanager
def _output_only_on_stdout(debug: bool) -> Iterator[None]:
    """Point file descriptor 1 at /dev/null (stderr when `debug`) and `sys.stdout` at a duplicate of the
    real standard output for the block. A `sys.stdout` already replaced (a test's capture) is left alone."""
    real = sys.stdout
    if real is None or real is not sys.__stdout__:
        yield
        return
    real.flush()
    saved = os.dup(1)
    sink = os.dup(2) if debug else os.open(os.devnull, os.O_WRONLY)
    os.dup2(sink, 1)
    os.close(sink)
    line_buffered = real.line_buffering or real.isatty()
    sys.stdout = open(saved, "w", buffering=1 if line_buffered else -1, encoding=real.encoding, errors=real.errors,
                      closefd=False)
    try:
        yield
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)  # so that nothing more is written to the closed pipe
        os.dup2(devnull, saved)
        os.close(devnull)
        raise
    finally:
        with contextlib.suppress(BrokenPipeError):
            sys.stdout.flush()
        sys.stdout = real
        os.dup2(saved, 1)
        os.close(saved)


def _version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("mixtral-jax")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
