"""File writing that loses no work.

- `atomic_write_text` / `atomic_write_json`: write to a temporary file in the same directory, flush +
  fsync, then `os.replace` it over the target. A crash at any point leaves either the old file or
  the new one, never a half-written file.
- `PartialResults`: an append-only JSONL side file (e.g. `out.json.partial.jsonl`) that a long
  generation run appends each finished batch to, so a killed run resumes where it stopped. A line
  cut short by `kill -9` is dropped (and cut off the file) on `load`.
- `write_alpaca_eval_json`: the final outputs, as the JSON list alpaca_eval reads.
- `atomic_directory` / `replace_directory`: build a whole folder (a merged model, a checkpoint, a
  tokenized dataset) in a temporary folder beside its target and swap it in only once it is complete,
  so a failure while building leaves the old folder untouched. Several processes (training ranks) can
  build one folder together (`sync=`).
- `usual_permissions`: the mode a plain `open()` would give (0666 minus the umask) for files that a
  library wrote owner-only (safetensors >= 0.8 writes 0600 files).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from difflm.errors import ConfigError

__all__ = [
    "atomic_write_text", "atomic_write_json", "PartialResults", "write_alpaca_eval_json", "atomic_directory",
    "replace_directory", "usual_permissions",
]


def _fsync_dir(directory: Path) -> None:
    """Persist a rename (best effort: not every platform can open a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (temp file in the same folder, flush + fsync, os.replace); parent
    directories are created. The file gets the usual permissions (0666 minus the umask), not mkstemp's 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically (see `atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """Serialise `obj` as JSON (UTF-8, non-ASCII kept) and write it atomically.

    The object is serialised before anything is written, so an unserialisable object leaves the old
    file untouched."""
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=indent) + "\n")


def _fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root` (so a rename of `root` never publishes unwritten data)."""
    for folder, _, files in os.walk(root):
        for name in files:
            try:
                fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            except OSError:  # a dangling link, a socket: nothing to persist
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


def usual_permissions(path: str | os.PathLike) -> None:
    """Give the file `path`, or every file and folder under the folder `path`, at least the permission
    bits a plain `open()` / `mkdir()` gives under the current umask (0644 / 0755 with umask 022).

    Some writers ignore the umask: safetensors >= 0.8 writes through a temporary file created 0600
    (safetensors issue #782), so a saved `model.safetensors` would be unreadable to the users who can
    read the `config.json` beside it. Bits are only added, never taken away (a file its owner may run
    gets the execute bits a folder gets); links are not followed."""
    mask = _umask()

    def fix(p: str | os.PathLike) -> None:
        st = os.lstat(p)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):  # a link, a socket: left alone
            return
        mode = stat.S_IMODE(st.st_mode)
        usual = (0o777 if stat.S_ISDIR(st.st_mode) or mode & stat.S_IXUSR else 0o666) & ~mask
        if mode | usual != mode:
            os.chmod(p, mode | usual)

    fix(path)
    if os.path.isdir(path) and not os.path.islink(path):
        for folder, dirs, files in os.walk(path):
            for name in dirs + files:
                fix(os.path.join(folder, name))


def replace_directory(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Put the complete folder `src` at `dst`, replacing any folder there; both on the same filesystem.

    Without a `dst`: one rename. With one: rename `dst` aside (to `src`'s name with `.old` for `.tmp`),
    rename `src` to `dst`, then remove the old folder. A failure of the second rename puts the old folder
    back. A crash (kill -9, power) loses nothing at any point: before the first rename `dst` is intact;
    between the two, `dst` is missing while the old folder waits at `.NAME.*.old` and the new one at
    `src` beside it (rename either back by hand); after the second, `dst` is the new folder and at most a
    half-removed `.NAME.*.old` is left over. Such a left-over `.old` of the same name (possible with the
    fixed names of `atomic_directory(sync=...)`) is removed before `dst` is moved aside: `dst` is newer.
    """
    src, dst = Path(src), Path(dst)
    if not dst.exists() and not dst.is_symlink():
        os.rename(src, dst)
        _fsync_dir(dst.parent)
        return
    if dst.is_symlink() or not dst.is_dir():
        raise ConfigError(f"{dst} is a {'link' if dst.is_symlink() else 'file'}, not a folder; not replacing it")
    stem = src.name[: -len(".tmp")] if src.name.endswith(".tmp") else src.name
    old = dst.with_name(stem + ".old")
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    os.rename(dst, old)
    try:
        os.rename(src, dst)
    except BaseException:
        os.rename(old, dst)
        raise
    _fsync_dir(dst.parent)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(
    path: str | os.PathLike, *, sync: Callable[[], None] | None = None, owner: bool = True
) -> Iterator[Path]:
    """Build a folder that replaces `path` only once it is complete.

    >>> with atomic_directory("runs/merged") as tmp:
    ...     model.save_pretrained(tmp)            # runs/merged is untouched until the block succeeds

    Yields a fresh, empty folder beside `path` (same filesystem; hidden name `.NAME.XXXXXXXX.tmp`, the
    usual permissions, not mkdtemp's 0700). When the block ends normally its files get the usual
    permissions (`usual_permissions`), are fsynced, and the folder replaces `path` (`replace_directory`);
    when it raises, the folder is removed and `path` is left as it was. Whether an existing `path` may be
    replaced is the caller's decision (check before the work).

    Several processes writing one folder (the ranks of a training run) all enter the block with the same
    `path`, `sync` (a barrier every process calls, e.g. `accelerator.wait_for_everyone`) and `owner=True`
    on exactly one of them. The folder then has the fixed name `.NAME.tmp` that every process knows; the
    owner removes one left by a killed run and creates it, `sync()` lets the others in, and after the
    block `sync()` waits for all of them before the owner swaps the folder in. Only the owner cleans up;
    the others leave the block before the swap is done (call `sync()` once more before reading `path`).
    """
    path = Path(path)
    if sync is None and not owner:
        raise ValueError("atomic_directory(owner=False) needs sync=, the barrier shared with the owner")
    tmp = path.with_name(f".{path.name}.tmp")
    if owner:
        path.parent.mkdir(parents=True, exist_ok=True)
        if sync is None:
            tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
        else:
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp)  # left by a run killed while building it
            tmp.mkdir()
    try:
        if owner:
            os.chmod(tmp, 0o777 & ~_umask())
        if sync is not None:
            sync()
        yield tmp
        if sync is not None:
            sync()
        if owner:
            usual_permissions(tmp)
            _fsync_tree(tmp)
            replace_directory(tmp, path)
    except BaseException:
        if owner:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_alpaca_eval_json(path: str | os.PathLike, records: list[dict]) -> None:
    """Write generation records as the JSON list alpaca_eval reads
    (`{instruction, output, generator, dataset, id}` per item), atomically."""
    atomic_write_json(path, list(records), indent=2)


class PartialResults:
    """Append-only JSONL file of finished records, for resumable runs.

    >>> part = PartialResults("out.json.partial.jsonl")
    >>> done = part.done_ids()                # ids already generated by an earlier run
    >>> part.append([{"id": "a", "output": "..."}])
    >>> records = part.load()                 # when the run is complete
    >>> part.remove()

    Each `append` writes whole lines, flushes and fsyncs, so after a crash at most the last line is
    incomplete; `load` drops it and truncates the file to the last complete line.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def load(self) -> list[dict]:
        """All complete records in order; [] when the file does not exist."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        records: list[dict] = []
        pos = 0  # byte offset just past the last good line
        for raw in data.splitlines(keepends=True):
            try:
                rec = json.loads(raw) if raw.strip() else {}
            except ValueError:
                rec = None
            if not isinstance(rec, dict):
                if data[pos + len(raw):].strip():  # a broken line is only allowed last
                    raise ConfigError(f"{self.path}: corrupt record at byte {pos} (not the last line)")
                break
            if rec:
                records.append(rec)
            pos += len(raw)
        if pos < len(data):  # drop the line cut short
            with open(self.path, "r+b") as f:
                f.truncate(pos)
                f.flush()
                os.fsync(f.fileno())
        elif data and not data.endswith(b"\n"):  # complete record, newline missing: add it
            with open(self.path, "ab") as f:
                f.write(b"\n")
                f.flush()
                os.fsync(f.fileno())
        return records

    def done_ids(self) -> set[str]:
        """The ids (as strings) of the records already saved."""
        return {str(r["id"]) for r in self.load() if "id" in r}

    def append(self, records: list[dict]) -> None:
        """Append records, one JSON line each, then flush and fsync."""
        if not records:
            return
        payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())

    def remove(self) -> None:
        """Delete the side file (after the final output was written)."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
