"""Writing outputs without ever losing a user's files: one helper for every stage.

Rules:
1. **Ours or untouched.** A stage replaces or deletes only what it can prove it wrote: its format marker
   (a token store's zarr attributes, a cache's Parquet metadata, our checkpoints' "family" entry, a stage
   directory's `.cca-pipe.json`). Anything else at an output path is an OutputError naming it, raised by
   `Claim` before any work is done.
2. **One writer per output.** `OutputLock` holds an exclusive `flock` on `<parent>/.<name>.lock`; the
   kernel releases it when the process dies (a SIGKILLed run never blocks the next one), and a second run
   into the same output fails at once, naming the process that holds it.
3. **Built beside, swapped in.** New outputs are assembled at `<target>.partial` (which also holds what an
   interrupted run resumes from) and moved into place by `commit`, so a failed run leaves the previous
   good output where it was. Every file is written under a temporary name and renamed (`atomic_file`).
   A file or a token store is swapped in whole; a stage directory file by file at every depth (StageDir),
   since a user's files may sit beside ours in any of its folders.

Linux/macOS only (fcntl), like the GPU nodes and laptops we run on.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import stat
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

MARKER = ".cca-pipe.json"  # in a stage directory: which stage wrote it and which files are its own
# Entries an output directory may hold before we claim it: what DVC writes beside its outputs.
_HARMLESS = (".gitignore",)


class OutputError(ValueError):
    """An output path we may not write; the message names it and the fix."""


# ----------------------------------------------------------------------------------------- atomic files


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` (unique to this process); on success it is renamed onto
    `path` (atomic on POSIX), on any error or interruption it is removed, so `path` is never half written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # is_atomic_leftover() knows this name
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def is_atomic_leftover(path: Path) -> bool:
    """A temporary file of atomic_file that a SIGKILL left behind (no `except` ran): never a finished file."""
    return path.is_file() and path.name.startswith(".") and path.name.endswith(".tmp")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_json(path: str | os.PathLike) -> dict | None:
    """A JSON object, or None if the file is missing, unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# ----------------------------------------------------------------------------------------- the lock


class OutputLock:
    """Exclusive lock on an output path: `flock` on the hidden file `<parent>/.<name>.lock`.

    The file holds the holder's pid, host and command, for the message a second writer gets. It is
    removed on release; acquiring re-checks that the locked file is still the one at the path (another
    process may have removed it between our open and our flock), the usual flock-and-unlink protocol.
    """

    def __init__(self, target: str | os.PathLike):
        self.target = Path(target)
        self.path = self.target.with_name(f".{self.target.name}.lock")
        self.fd: int | None = None

    def acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_fd(fd)
                os.close(fd)
                raise OutputError(
                    f"{self.target} is being written by another cca-pipe process ({holder}): wait for it to "
                    f"finish, or stop it, or choose another output path") from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
                "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # while still holding it: a waiting process then sees a stale inode and retries
        os.close(self.fd)
        self.fd = None


def _read_fd(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {info['pid']} on {info['host']}, running `{info['command']}` since {info['since']}"
    except (OSError, ValueError, KeyError):
        return "a process that has not yet written its name"


# ----------------------------------------------------------------------------------------- ownership


def harmless_dir(path: Path) -> bool:
    """An existing directory we may claim without a marker: it holds nothing but DVC's .gitignore and
    empty folders (nothing anybody could lose)."""
    for entry in path.iterdir():
        if entry.name in _HARMLESS and entry.is_file():
            continue
        if entry.is_dir() and not entry.is_symlink() and harmless_dir(entry):
            continue
        return False
    return True


def written_by(stage: str) -> Callable[[Path], bool]:
    """Test for a JSON sidecar of ours: an object whose "written_by" names the stage (see stage_json)."""
    return lambda path: path.is_file() and (read_json(path) or {}).get("written_by") == f"cca-pipe {stage}"


def stage_json(stage: str, data: dict) -> dict:
    return {"written_by": f"cca-pipe {stage}", **data}


def stage_marker(path: Path) -> dict | None:
    marker = read_json(path / MARKER) if path.is_dir() else None
    return marker if marker and isinstance(marker.get("stage"), str) else None


def _describe(path: Path) -> str:
    if path.is_symlink():
        return "a symbolic link"
    if path.is_dir():
        names = sorted(p.name for p in path.iterdir())
        return f"a directory holding {names[:4]}{' ...' if len(names) > 4 else ''}"
    return "a file" if path.exists() else "nothing"


class Claim:
    """The right to write one output path, checked before any work.

    `owned(path)` says whether an existing path at `target` is this stage's own output, which we may
    replace; `owned_partial` likewise for `<target>.partial` (default: the same test); `sidecars` maps
    further files the stage writes (e.g. a metrics.json beside a checkpoint) to their tests. Use as a context manager: the lock is held inside, parents created
    for the output are removed again if nothing was committed.
    """

    def __init__(self, target: str | os.PathLike, *, what: str, owned: Callable[[Path], bool],
                 owned_partial: Callable[[Path], bool] | None = None, sidecars: dict[Path, Callable[[Path], bool]] | None = None):
        self.target = Path(target)
        self.partial = self.target.with_name(self.target.name + ".partial")
        self.what = what
        self.owned = owned
        self.owned_partial = owned_partial or owned
        self.sidecars = sidecars or {}  # other files the stage writes beside the target, with their own tests
        self.lock = OutputLock(self.target)
        self._made_parents: list[Path] = []
        self.committed = False

    def check(self) -> None:
        checks = [(self.target, "output", self.owned), (self.partial, "unfinished output", self.owned_partial),
                  *((path, "output", owned) for path, owned in self.sidecars.items())]
        for path, role, owned in checks:
            if path.is_symlink() or (path.exists() and not owned(path)):
                raise OutputError(
                    f"{path} ({role} of {self.what}) already exists and is not cca-pipe's own: it is "
                    f"{_describe(path)}. Nothing was changed; move it away or choose another output path")

    def __enter__(self) -> Claim:
        missing = [p for p in reversed(self.target.parents) if not p.exists()]
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self._made_parents = missing
        try:
            self.lock.acquire()
            self.check()
        except BaseException:
            self._cleanup()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._cleanup()

    def _cleanup(self) -> None:
        self.lock.release()
        if not self.committed:
            for parent in reversed(self._made_parents):
                with contextlib.suppress(OSError):
                    parent.rmdir()  # only if still empty

    def discard_partial(self) -> None:
        """Remove an unfinished output of ours that cannot be resumed (other settings or inputs)."""
        remove_path(self.partial)

    def commit_path(self, built: Path | None = None) -> None:
        """Swap the finished `built` (default: the partial) into the target: file or whole directory."""
        replace_path(built or self.partial, self.target)
        self.committed = True


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def replace_path(built: Path, target: Path) -> None:
    """Move `built` onto `target`. A file is renamed over it atomically; a directory target (ours) is first
    renamed aside to `<target>.old`, so at every instant one complete version exists under a known name."""
    if built.is_dir() and target.exists():
        old = target.with_name(target.name + ".old")
        remove_path(old)
        os.replace(target, old)
        os.replace(built, target)
        remove_path(old)
    else:
        os.replace(built, target)


# ----------------------------------------------------------------------------------------- stage directories


class StageDir(Claim):
    """A stage's output directory (train, eval, report, prepare): its files are built in `partial` and
    moved into `target` on commit, file by file, at every depth. The target's `.cca-pipe.json` lists the
    files (relative paths) and directories this stage wrote, so a later commit replaces and removes only
    those; anything else a user keeps there, at any depth (`checkpoints/notes.txt`), is left alone, and a
    directory of ours is removed only once it is empty. A user's file where this run would write one of
    ours is an OutputError naming it, raised before anything is moved. The marker also records what each
    file of ours held ("written": size, mtime, ctime, inode, sha256): one whose bytes changed since is the
    user's (_changed_since_written), kept like any file of theirs, and refused where this run writes one.

    A kill in the middle of `commit` leaves every file whole (each is renamed into place), some of them
    from the new run and some from the old one; the target's marker then claims both sets and the
    partial's marker the plan, so the next run of the stage into that directory finishes the commit
    before it starts (the same files, then the new run replaces them as usual).
    """

    def __init__(self, target: str | os.PathLike, stage: str, key: str = ""):
        super().__init__(target, what=f"cca-pipe {stage}", owned=self._owned)
        self.stage, self.key = stage, key

    def _owned(self, path: Path) -> bool:
        if not path.is_dir():
            return False
        marker = stage_marker(path)
        return (marker is not None and marker["stage"] == self.stage) or harmless_dir(path)

    def __enter__(self) -> StageDir:
        super().__enter__()
        marker = stage_marker(self.partial) or {}
        if isinstance(marker.get("committing"), dict):  # a commit interrupted by a kill: finish it first
            try:
                self._finish_commit(marker)
            except BaseException:
                self._cleanup()
                raise
            self.committed = False  # this run has committed nothing yet
        return self

    def open_partial(self) -> Path:
        """The partial directory, kept if it was left by an interrupted run with the same key, else fresh."""
        marker = stage_marker(self.partial)
        if marker is None or marker.get("key") != self.key:
            self.discard_partial()
        self.partial.mkdir(parents=True, exist_ok=True)
        write_json(self.partial / MARKER, {"stage": self.stage, "key": self.key, "partial": True})
        return self.partial

    def resumed(self) -> bool:
        marker = stage_marker(self.partial)
        return marker is not None and marker.get("key") == self.key

    def commit(self) -> None:
        """Move every file of the partial directory into the target; remove our files of an earlier run
        that this run did not write; record the new set in the marker. A file of ours whose bytes changed
        since we wrote it is the user's now: kept (no longer listed), or refused where this run writes."""
        files, dirs = _tree(self.partial)
        old_files, old_dirs = _owned_tree(self.target)
        changed = _changed_since_written(self.target, old_files)
        old_files = [f for f in old_files if f not in changed]
        _check_commit(self.target, files, dirs, set(old_files), set(old_dirs), changed)
        plan = {"files": files, "dirs": dirs, "old_files": old_files, "old_dirs": old_dirs}
        marker = {"stage": self.stage, "key": self.key, "partial": True, "committing": plan}
        write_json(self.partial / MARKER, marker)  # from here on, a killed commit is rolled forward
        self._finish_commit(marker)

    def _finish_commit(self, marker: dict) -> None:
        plan = marker["committing"]
        files, dirs, old_files, old_dirs = (plan[k] for k in ("files", "dirs", "old_files", "old_dirs"))
        self.target.mkdir(parents=True, exist_ok=True)
        # while old and new files are both present, the marker claims both
        write_json(self.target / MARKER, {"stage": self.stage, "key": marker["key"],
                                          "files": sorted({*files, *old_files}), "dirs": sorted({*dirs, *old_dirs})})
        for name in dirs:  # sorted: parents first
            dest = self.target / name
            if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
                dest.unlink()  # a file of ours where this run has a directory (_check_commit)
            dest.mkdir(exist_ok=True)
        for name in files:
            src, dest = self.partial / name, self.target / name
            if not (src.exists() or src.is_symlink()):
                continue  # moved already, by the commit this one finishes
            if dest.is_dir() and not dest.is_symlink():
                shutil.rmtree(dest)  # a directory holding only files of ours (_check_commit)
            os.replace(src, dest)
        for name in set(old_files) - set(files):
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                (self.target / name).unlink()
        kept = []  # directories of ours that a user's file keeps: still ours, removed once empty
        for name in sorted(set(old_dirs) - set(dirs), key=lambda d: d.count("/"), reverse=True):
            try:
                (self.target / name).rmdir()  # only if empty
            except FileNotFoundError:
                pass
            except OSError:
                kept.append(name)
        written = {name: record for name in files if (record := _written_record(self.target / name)) is not None}
        write_json(self.target / MARKER, {"stage": self.stage, "key": marker["key"], "files": files,
                                          "dirs": sorted({*dirs, *kept}), "written": written})
        remove_path(self.partial)
        self.committed = True


def _tree(root: Path) -> tuple[list[str], list[str]]:
    """Relative POSIX paths of the files (symbolic links included) and of the directories under `root`,
    sorted (parents before children), without the top-level marker."""
    files, dirs = [], []
    for dirpath, dirnames, filenames in os.walk(root):  # does not follow links to directories
        here = Path(dirpath)
        rel = here.relative_to(root)
        for name in dirnames:
            (files if (here / name).is_symlink() else dirs).append((rel / name).as_posix())
        files += [(rel / name).as_posix() for name in filenames if not (rel == Path(".") and name == MARKER)]
    return sorted(files), sorted(dirs)


def _owned_tree(target: Path) -> tuple[list[str], list[str]]:
    """The files and directories the target's marker says are ours. A marker of the earlier format lists
    top-level entries, each ours as a whole (what it claimed)."""
    marker = stage_marker(target) or {}
    if isinstance(marker.get("files"), list):
        return [str(f) for f in marker["files"]], [str(d) for d in marker.get("dirs", [])]
    files, dirs = [], []
    for name in marker.get("entries", []):
        path = target / str(name)
        if path.is_dir() and not path.is_symlink():
            inner_files, inner_dirs = _tree(path)
            files += [f"{name}/{f}" for f in inner_files]
            dirs += [str(name), *(f"{name}/{d}" for d in inner_dirs)]
        else:
            files.append(str(name))
    return files, dirs


def _written_record(path: Path) -> list | None:
    """What the marker records of a regular file we wrote: [size, mtime_ns, ctime_ns, inode, sha256]."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, file_sha256(path)]


def _changed_since_written(target: Path, names: list[str]) -> set[str]:
    """The files of ours (`names`, from the target's marker) whose bytes are no longer what we wrote: the
    user's now. A file whose stat is as recorded is unchanged without a read (a write, even one that keeps
    size and mtime, moves the ctime, which no one can set); any other is hashed (a copy or a DVC checkout
    of our bytes is still ours). A marker of the earlier format records no bytes: its files stay ours."""
    written = (stage_marker(target) or {}).get("written")
    if not isinstance(written, dict):
        return set()
    changed = set()
    for name in names:
        record, path = written.get(name), target / name
        if not (isinstance(record, list) and len(record) == 5) or not (path.exists() or path.is_symlink()):
            continue  # not recorded (a link of ours), or gone: nothing of anyone's to keep
        try:
            st = os.lstat(path)
            same = stat.S_ISREG(st.st_mode) and ([st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino] == record[:4] or (
                st.st_size == record[0] and file_sha256(path) == record[4]))
        except OSError:
            same = False  # unreadable: not provably ours
        if not same:
            changed.add(name)
    return changed


def _check_commit(target: Path, files: list[str], dirs: list[str], old_files: set[str], old_dirs: set[str],
                  changed: set[str] = frozenset()) -> None:
    """Refuse, before anything is moved, to put a file or directory of ours where a user's thing is (`changed`:
    files we wrote whose bytes the user has since replaced)."""
    for name in dirs:
        dest = target / name
        if (dest.is_symlink() or (dest.exists() and not dest.is_dir())) and name not in old_files:
            _refuse(dest, "a directory", name in changed)
    for name in files:
        dest = target / name
        if dest.is_dir() and not dest.is_symlink():
            inner_files, inner_dirs = _tree(dest)
            if name in old_dirs and all(f"{name}/{f}" in old_files for f in inner_files) \
                    and all(f"{name}/{d}" in old_dirs for d in inner_dirs):
                continue
            _refuse(dest, "a file", any(f"{name}/{f}" in changed for f in inner_files))
        elif (dest.exists() or dest.is_symlink()) and name not in old_files:
            _refuse(dest, "a file", name in changed)


def _refuse(dest: Path, kind: str, changed: bool = False) -> None:
    what = ("was written by cca-pipe but its bytes have changed since, so it is yours now" if changed else
            f"is not cca-pipe's own (it is {_describe(dest)})")
    raise OutputError(f"{dest} {what} but this run writes {kind} there: "
                      "move it away and rerun (the finished run waits in the .partial directory beside it)")
