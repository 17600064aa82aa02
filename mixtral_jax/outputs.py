"""Folders this project writes: atomic staging, the marker that names them ours, and what `--force` may replace.

Every output folder (a `convert` model folder, a `train` OUTPUT, an `export` Hugging Face folder) holds a
marker file, `MARKER`, naming its kind. Replacing a folder is the one destructive thing the commands do, so
`check_replaceable` allows it only for an empty folder or one that this project wrote (marked, or a model
folder or training output of an older version, recognised by their files) holding nothing but what that
kind of output holds, and neither being, containing nor lying inside a source of the command or the working
directory. Everything else is refused before anything is touched.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Iterator, Sequence

from mixtral_jax.errors import MixtralError

MARKER = ".mixtral-jax.json"
_STAGING = ".partial-"
# The entries each kind of output holds at its top level (its marker besides).
ENTRIES = {
    "model": {"model_config.json", "tokenizer.model", "params"},
    "training": {"model_config.json", "train_config.json", "tokenizer.model", "metrics.jsonl", "checkpoints"},
    "export": {"config.json", "model.safetensors", "tokenizer.model"},
}


class OutputError(MixtralError):
    """An output path that cannot be written or replaced."""


def mark(folder: str | os.PathLike, kind: str) -> None:
    """Name `folder` an output of `kind` (one of `ENTRIES`)."""
    (Path(folder) / MARKER).write_text(json.dumps({"written_by": "mixtral-jax", "kind": kind}) + "\n")


def kind_of(folder: Path) -> str | None:
    """The kind of output `folder` is, by its marker or, unmarked, by the files of a model folder or
    training output; None for anything else."""
    try:
        kind = json.loads((folder / MARKER).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        kind = None
    if kind in ENTRIES:
        return kind
    if (folder / "model_config.json").is_file() and (folder / "checkpoints").is_dir():
        return "training"
    if (folder / "model_config.json").is_file() and (folder / "params" / "_METADATA").is_file():
        return "model"
    return None


def check_replaceable(output: str | os.PathLike, sources: Sequence[str | os.PathLike] = ()) -> None:
    """Raise OutputError unless `output` is absent or a folder that replacing loses nothing of the user's."""
    path = Path(output)
    if not path.exists() and not path.is_symlink():
        return
    target = path.resolve()
    if not target.is_dir():
        raise OutputError(f"{path}: exists and is not a folder; refusing to replace it")
    for source in sources:
        source = Path(source).resolve()
        if target == source or target in source.parents or source in target.parents:
            relation = "is" if target == source else "contains" if target in source.parents else "lies inside"
            raise OutputError(f"{path}: {relation} the source {source}; refusing to replace it")
    if target == Path.cwd().resolve() or target in Path.cwd().resolve().parents:
        raise OutputError(f"{path}: is or contains the working directory; refusing to replace it")
    if not any(target.iterdir()):
        return
    kind = kind_of(target)
    if kind is None:
        raise OutputError(f"{path}: not a folder written by mixtral-jax; refusing to replace it (remove it "
                          "yourself or choose another output)")
    ours = ENTRIES[kind] | {MARKER} | {f".{name}.tmp" for name in ENTRIES[kind]}  # and atomic writes' temporaries
    foreign = sorted(e.name for e in target.iterdir() if e.name not in ours)
    if foreign:
        raise OutputError(f"{path}: holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}, "
                          f"which a {kind} output does not; refusing to replace it")


def check_parents(output: str | os.PathLike) -> None:
    """Raise OutputError where a file stands where a folder above `output` would have to be."""
    output = Path(output).absolute()
    blocking = next((p for p in reversed(output.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise OutputError(f"{output}: cannot write ({blocking} is a file, not a folder)")


@contextlib.contextmanager
def staging(output: str | os.PathLike, kind: str, force: bool = False,
            sources: Sequence[str | os.PathLike] = ()) -> Iterator[Path]:
    """A fresh folder beside `output`, marked as `kind`, renamed to `output` when the block succeeds and
    removed when it fails.

    An existing `output` is refused unless `force`, and then replaced only where `check_replaceable`
    allows it. Folders left by killed runs (their process is gone) are removed first, so a rerun starts
    clean. An OSError (no room, no permission, a file where a folder should be) becomes one OutputError
    naming the path.
    """
    output = Path(output).absolute()
    check_parents(output)
    if output.exists() and not force:
        raise OutputError(f"{output}: already exists (pass --force to replace it)")
    check_replaceable(output, sources)
    output = output.resolve() if output.is_symlink() else output  # replace the folder, keep the link
    prefix = f".{output.name}{_STAGING}"
    tmp = output.parent / f"{prefix}{os.getpid()}"
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        for stale in output.parent.glob(glob.escape(prefix) + "*"):
            pid = stale.name[len(prefix):]
            if not pid.isdigit() or not _alive(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as e:
        raise write_error(e, output) from None
    try:
        yield tmp
        mark(tmp, kind)
        if not output.exists():
            tmp.rename(output)
        elif _exchange(tmp, output):  # tmp now holds the old output
            _remove(tmp)
        else:  # no atomic exchange here: the old output is moved aside for two renames' time
            old = output.parent / f"{prefix}{os.getpid()}-old"
            output.rename(old)
            tmp.rename(output)
            _remove(old)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and system_errno(e) is not None:
            raise write_error(e, output) from None
        raise


def replace_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """`path` written whole or not at all: `write` fills a temporary beside it, which then replaces it."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Errors the system gives the writes of the block (no room, no permission, a file in the way) as one
    OutputError naming `path`."""
    try:
        yield
    except Exception as e:
        if system_errno(e) is None:
            raise
        raise write_error(e, path) from None


# How tensorstore (`[os_error_code='28']`) and safetensors (`(os error 28)`) report a failed system call.
_ERRNO = re.compile(r"os[_ ]error(?:_code='| )(\d+)")


def system_errno(e: Exception) -> int | None:
    """The errno of an error a system call gave: an OSError's, or one that a library reports in its message."""
    if isinstance(e, OSError):
        return e.errno
    match = _ERRNO.search(str(e))
    return int(match[1]) if match else None


def write_error(e: Exception, path: Path) -> OutputError:
    """A failed write as one line: the file in `path` that an OSError names (else `path`) and the cause."""
    named = Path(os.fsdecode(e.filename)) if isinstance(e, OSError) and e.filename else None
    name = named if named is not None and (named == Path(path) or Path(path) in named.parents) else path
    code = system_errno(e)
    return OutputError(f"{name}: cannot write ({os.strerror(code) if code else e})")


def readable_by_all(path: Path) -> None:
    """Give a file the mode a new file gets by default (0666 less the umask): some writers create 0600."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux `renameat2(RENAME_EXCHANGE)`); False where unsupported."""
    renameat2 = getattr(_LIBC, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


_LIBC = ctypes.CDLL(None, use_errno=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
