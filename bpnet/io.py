"""Small I/O helpers shared by every task: atomic writes and status.json."""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Optional

from .errors import BpnetError, SpecError


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # once, at import: os.umask is process-wide and racy in threads


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; rename it over ``path`` on success.

    An interrupted writer leaves at most a hidden ``.*.tmp`` file, never a
    file under the final name that looks complete.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _cannot_write(path, e) from None
    os.close(fd)
    try:
        yield Path(tmp)
        if os.path.isfile(tmp):  # mkstemp makes 0600; give files the usual permissions
            os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename in (tmp, str(path), None):
            raise _cannot_write(path, e) from None
        raise


def _cannot_write(path: Path, e: OSError) -> OSError:
    """The error of a failed atomic write, naming the file asked for, not the hidden
    temporary one (still an OSError, with its errno)."""
    why = e.strerror or str(e)
    blocker = next((p for p in Path(path).parents if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        why = f"{blocker} is a file, not a folder"
    return OSError(e.errno, f"cannot write {path}: {why}")


def write_bytes_atomic(path, data: bytes):
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def write_text_atomic(path, text: str):
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path, obj, indent: Optional[int] = 2):
    write_text_atomic(path, json.dumps(obj, indent=indent, default=json_default) + "\n")


def json_default(o):
    """``json.dumps`` default for NumPy scalars and arrays and paths."""
    import numpy as np
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


class Status:
    """The ``status.json`` every task keeps in its results dir.

    STARTED when the task begins, RUNNING with progress (throttled to one
    write a second), SUCCESS or FAILURE with the message at the end.
    """

    def __init__(self, results_dir, task: str):
        self.path = Path(results_dir) / "status.json"
        self.task = task
        self.started = time.time()
        self._last = 0.0
        self.extra: dict = {}
        self._write("STARTED", "")

    def _write(self, status, message, **kw):
        doc = {"task": self.task, "status": status, "message": message,
               "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.started)),
               "elapsed_s": round(time.time() - self.started, 3), **self.extra, **kw}
        write_json_atomic(self.path, doc)

    def progress(self, done, total=None, message: str = "", force: bool = False, **kw):
        now = time.time()
        if not force and now - self._last < 1.0:
            return
        self._last = now
        prog = {"done": done}
        if total:
            prog["total"] = total
            prog["fraction"] = round(done / total, 4)
        self._write("RUNNING", message, progress=prog, **kw)

    def success(self, message: str = "", **kw):
        self.extra.update(kw)
        self._write("SUCCESS", message)

    def failure(self, message: str):
        self._write("FAILURE", message)



def check_not_input(output, inputs, what: str = "the output"):
    """BpnetError if ``output`` is one of ``inputs`` ((name, path) pairs; None paths ignored)."""
    for name, path in inputs:
        if path is not None and same_file(output, path):
            raise BpnetError(f"{what} {output} is {name}; a command never writes over its "
                             "own input: choose another name")


def same_file(a, b) -> bool:
    """Whether paths ``a`` and ``b`` name one file (through links too; by path when one is
    missing): a command must never write its output over one of its inputs."""
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        try:
            return os.path.samefile(a, b)
        except OSError:
            return False
    return a.resolve() == b.resolve()


def _parse_error(e: Exception, text: str) -> str:
    """Where and what a YAML or JSON parse error is, on one line."""
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
    if mark is not None and problem:  # PyYAML: 0-based line and column
        where = f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
        context = getattr(e, "context", None)
        msg = where + (f" ({context})" if context else "")
    else:  # json.JSONDecodeError says where itself
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    if re.search(r"^\s*[A-Za-z_]\w*\s*\{\s*$", text, flags=re.M):
        msg += ("; this looks like a protobuf-text spec (name { ... } blocks): bpnet reads "
                "YAML or JSON specs with TAO BodyPoseNet's keys (docs/specs.md)")
    return msg


def read_mapping(path) -> dict:
    """Read a YAML or JSON file into a dict, with clear errors."""
    path = Path(path)
    if not path.exists():
        raise SpecError(f"{path}: file not found")
    if path.is_dir():
        raise SpecError(f"{path}: is a folder, expected a YAML or JSON file")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"{path}: cannot read ({e})") from e
    try:
        if not text.strip():
            data = None
        elif path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml
            data = yaml.safe_load(text)
    except Exception as e:  # yaml/json both have several error types
        raise SpecError(f"{path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}: "
                        f"{_parse_error(e, text)}") from e
    if data is None:  # an empty file (or only comments): never run on silent defaults
        raise SpecError(f"{path}: the file is empty; write the keys it needs (an explicit {{}} "
                        "means all defaults)")
    if not isinstance(data, dict):
        raise SpecError(f"{path}: the top level must be a mapping of keys to values")
    return data


# ------------------------------------------------------------------ one run at a time

LOCK_NAME = ".bpnet.lock"


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except OSError:
        return False
    return True


def _read_lock(path: Path):
    """(pid, host, task) of a lock file; pid 0 when it cannot be read."""
    try:
        doc = json.loads(path.read_text() or "{}")
        return int(doc.get("pid", 0)), str(doc.get("host", "")), str(doc.get("task", ""))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0, "", ""


class RunLock:
    """A lock file that lets one run at a time use a folder or an output prefix.

    Created atomically (O_CREAT | O_EXCL) and holding the owner's pid, host and
    task. A lock whose owner is dead (same host, pid gone), or that is empty
    (its writer died between creating and filling it), is taken over. Released
    on ``release()`` (also from ``with``), which removes the file only while it
    is still this process's. ``what``: how messages name the locked thing.
    """

    def __init__(self, path, what: str, task: str = ""):
        self.path = Path(path)
        self.what = what
        self.task = task
        self.held = False

    def acquire(self):
        import socket
        host = socket.gethostname()
        doc = json.dumps({"pid": os.getpid(), "host": host, "task": self.task,
                          "started": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n"
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                pid, lhost, task = _read_lock(self.path)
                if pid == os.getpid() and lhost == host:
                    raise BpnetError(f"{self.what} is already locked by this run ({self.path}, "
                                     f"for its {task or 'other'} lock): one folder cannot serve "
                                     "two roles; use separate folders") from None
                stale = pid == 0 and self._old_enough() or (lhost == host and pid
                                                            and not _pid_alive(pid))
                if not stale:
                    who = f"pid {pid}" + (f" on {lhost}" if lhost and lhost != host else "")
                    who += f" ({task})" if task else ""
                    raise BpnetError(
                        f"{self.what} is in use by another run: {who} holds the lock "
                        f"{self.path}; wait for it to finish (or delete the lock file if that "
                        "run is gone)") from None
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)  # a dead owner's lock: take it over
                continue
            except OSError as e:
                raise BpnetError(f"cannot lock {self.what}: {e.strerror or e} "
                                 f"({self.path})") from None
            with os.fdopen(fd, "w") as f:
                f.write(doc)
            self.held = True
            return self
        raise BpnetError(f"cannot lock {self.what}: the lock {self.path} keeps changing hands")

    def _old_enough(self) -> bool:
        """An unreadable lock counts as dead once it is a few seconds old (its writer had
        time to fill it)."""
        try:
            return time.time() - self.path.stat().st_mtime > 5.0
        except OSError:
            return True

    def release(self):
        if not self.held:
            return
        self.held = False
        pid, _, _ = _read_lock(self.path)
        if pid == os.getpid():
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


@contextlib.contextmanager
def output_lock(path, task: str):
    """The lock of one output file, ``.<name>.bpnet.lock`` beside it, held in a ``with``:
    two runs writing one file at once (with different results dirs) would both report
    success while one's file is lost. The file's folder is made for the lock; folders made
    here that are still empty at the end (the run failed before writing) are removed."""
    path = Path(path)
    made = missing_folders(path.parent)
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BpnetError(_cannot_write(path, e).strerror) from None
        with RunLock(path.parent / f".{path.name}.bpnet.lock", f"output {path}", task):
            yield
    finally:
        remove_empty_folders(made)


def missing_folders(folder) -> list:
    """``folder`` and those of its parents that do not exist yet, deepest first: the folders
    a run that makes ``folder`` creates, for ``remove_empty_folders`` to take back."""
    made, f = [], Path(folder).absolute()
    while not f.exists() and f != f.parent:
        made.append(f)
        f = f.parent
    return made


def remove_empty_folders(folders):
    """Remove ``folders`` (deepest first) while they are empty: files in one, another run's
    or this run's, keep it and the folders above it."""
    for d in folders:
        try:
            d.rmdir()
        except OSError:
            return
