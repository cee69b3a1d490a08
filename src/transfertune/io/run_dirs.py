"""Writing what a user keeps without losing it.

Training claims its output directory first (`claim_output`), before any model loads: the directory must be
new or empty, or hold an unfinished run with the same settings to resume, or be replaced on request
(`overwrite` removes only what transfertune wrote there, and refuses while anything else is left). It may not
be, or lie inside, a model that training reads. It is checked writable and locked (`.transfertune.lock`), so a
second writer is refused at once. `.transfertune-run.json` records the run (an id, its settings, whether it
finished); checkpoints carry the id, so `resume` continues from the last complete checkpoint of this run.
A refused claim leaves nothing behind: no lock file, no directory it created.

`overwrite` of a directory that holds a model or checkpoints keeps it whole until the new one is saved: the run
trains beside it, in `.NAME.transfertune-next` (checkpoints included), and the finished directory is swapped
in (`swap_in`: one `renameat2(RENAME_EXCHANGE)` on Linux, elsewhere two renames that the next claim completes
or undoes if a kill falls between them), then the old one is deleted. A kill, Ctrl-C or refusal at any point
leaves the old directory or the new one. `resume` continues an interrupted `overwrite` run there.

Directories are staged in a temporary directory and renamed into place (`staged_directory`); into an
existing directory the files move one by one with the commit marker (transfertune.json) removed first and
moved last, so a kill never leaves a half-written directory that loads. Files are written to a temporary
file and renamed (`write_atomic`).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from transfertune.io.validate import InputError, check_safetensors

log = logging.getLogger(__name__)

LOCK_NAME = ".transfertune.lock"
RUN_NAME = ".transfertune-run.json"
STAGING_PREFIX = ".transfertune-staging-"
NEXT_SUFFIX = ".transfertune-next"  # beside --output: the directory an --overwrite run trains in
OLD_SUFFIX = ".transfertune-old"  # beside --output: the replaced directory, while it is deleted
MARKER = "transfertune.json"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# what value directories written before transfertune.json listed its files could hold
LEGACY_VALUE_FILES = frozenset({
    "config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
    "adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt", "added_tokens.json",
    "tokenizer.model",
})


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write a file through a temporary file in the same directory and a rename: readers see old or new."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def staged_directory(target: str | Path, *, marker: str | None = MARKER,
                     replaces: Iterable[str] = ()) -> Iterator[Path]:
    """Yield an empty staging directory; when the block succeeds, its files become `target`'s.

    A new target is the staging directory renamed (one atomic step). In an existing target the old `marker`
    is removed first, files named in `replaces` that the new set lacks are removed (stale weights of another
    kind), the new files replace theirs, and the new marker comes last. Other files in the target are kept.
    """
    target = Path(target)
    fresh = not target.exists()
    host = target.parent if fresh else target
    host.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=host))
    try:
        os.chmod(staging, 0o777 & ~_umask())
        yield staging
        if fresh:
            try:
                os.rename(staging, target)
                return
            except OSError:
                if not target.is_dir():
                    raise
        _move_in(staging, target, marker, set(replaces))
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _move_in(staging: Path, target: Path, marker: str | None, replaces: set[str]) -> None:
    new = {p.name for p in staging.iterdir()}
    if marker and (target / marker).exists():
        (target / marker).unlink()
    for name in sorted(replaces - new):
        if (target / name).exists() or (target / name).is_symlink():
            _remove(target / name)
    for name in sorted(new - {marker}):
        dst = target / name
        if (staging / name).is_dir() and dst.is_dir():
            shutil.rmtree(dst)
        os.replace(staging / name, dst)
    if marker in new:
        os.replace(staging / marker, target / marker)


def manifest(directory: str | Path) -> set[str]:
    """Names of the files the value directory's transfertune.json says it wrote (old ones: the usual names)."""
    directory = Path(directory)
    path = directory / MARKER
    if not path.is_file():
        return set()
    try:
        from transfertune.io.validate import read_json_file

        files = read_json_file(path, MARKER).get("files")
    except InputError:
        files = None
    if isinstance(files, list) and all(isinstance(f, str) for f in files):
        return {f for f in files if f and "/" not in f and "\\" not in f and f not in (".", "..")} | {MARKER}
    return {p.name for p in directory.iterdir() if p.name in LEGACY_VALUE_FILES} | {MARKER}


def check_writable(directory: Path, what: str) -> None:
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        raise InputError(f"{what} {directory} is not writable ({err.strerror})") from None


# -- training runs --------------------------------------------------------------------------------------
@dataclass
class Claim:
    """An output directory held by one training run."""

    directory: Path  # where the run writes: --output, or beside it for an --overwrite run
    run_id: str
    resume_from: str | None = None  # the checkpoint to continue from
    target: Path | None = None  # the --output that `directory` replaces when the run finishes

    def finish(self, processes: int = 1) -> None:
        """Mark the run finished, recording how many processes trained it; an --overwrite run then replaces
        its --output."""
        record = read_run(self.directory) or {}
        write_atomic(self.directory / RUN_NAME,
                     json.dumps({**record, "finished": True, "processes": processes}, indent=2) + "\n")
        if self.target is not None:
            swap_in(self.directory, self.target)


def read_run(directory: Path) -> dict | None:
    path = Path(directory) / RUN_NAME
    if not path.is_file():
        return None
    from transfertune.io.validate import read_json_file

    return read_json_file(path, "transfertune run record")


def is_main_process() -> bool:
    """Rank 0 of a distributed launch (accelerate / torchrun set RANK), or a single process."""
    return int(os.environ.get("RANK", "0")) == 0


def latest_checkpoint(directory: str | Path, run_id: str) -> str | None:
    """The highest complete `checkpoint-N` of run `run_id`: trainer_state.json (written last) must read back
    with global_step N, the value files must carry the run's id, and its weights and saved training state must
    be whole files (a disk that filled up, a bad copy). Others are skipped, with a warning."""
    best: tuple[int, Path] | None = None
    for path in Path(directory).iterdir():
        match = CHECKPOINT.match(path.name)
        if not match or not path.is_dir():
            continue
        step = int(match.group(1))
        try:
            state = json.loads((path / "trainer_state.json").read_text())
            config = json.loads((path / MARKER).read_text())
        except (OSError, ValueError, RecursionError):
            log.warning("skipping %s: incomplete (interrupted while it was written?)", path)
            continue
        if not isinstance(state, dict) or not isinstance(config, dict):
            log.warning("skipping %s: its trainer_state.json or %s is not a JSON object", path, MARKER)
            continue
        if (config.get("extra") or {}).get("run_id") != run_id:
            log.warning("skipping %s: written by another training run", path)
            continue
        if state.get("global_step") != step:
            log.warning("skipping %s: its trainer state is for step %s", path, state.get("global_step"))
            continue
        damaged = _damaged_file(path)
        if damaged:
            log.warning("skipping %s: %s", path, damaged)
            continue
        if best is None or step > best[0]:
            best = (step, path)
    return str(best[1]) if best else None


def _damaged_file(checkpoint: Path) -> str | None:
    """Why one of a checkpoint's weight or state files cannot be read back, if one cannot: a safetensors header
    that does not cover the file, or a torch.save archive without its closing directory (both are read from
    the header or the end of the file, not loaded)."""
    for path in sorted(checkpoint.iterdir()):
        if path.suffix == ".safetensors":
            try:
                check_safetensors(path)
            except InputError as err:
                return str(err)
        elif path.suffix in (".pt", ".pth") and not zipfile.is_zipfile(path):
            return f"{path} is not a whole torch.save file: it is truncated or corrupt"
    return None


def _inside(path: Path, other: Path) -> bool:
    return path == other or other in path.parents


def _owned(directory: Path, record: dict | None) -> tuple[list[Path], list[Path]]:
    """(entries transfertune wrote, everything else) in `directory`, the lock file excluded."""
    value_files = manifest(directory)
    ours, others = [], []
    for path in sorted(directory.iterdir()):
        name = path.name
        if name == LOCK_NAME:
            continue
        is_checkpoint = CHECKPOINT.match(name) and path.is_dir() and (
            (path / MARKER).exists() or (path / "trainer_state.json").exists())
        mine = (name in value_files or name == RUN_NAME or name.startswith(STAGING_PREFIX) or is_checkpoint
                or (name.startswith("vocab_map-") and (value_files or record is not None)))
        (ours if mine else others).append(path)
    return ours, others


def _listing(paths: list[Path], limit: int = 5) -> str:
    names = [p.name + ("/" if p.is_dir() else "") for p in paths]
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


@contextmanager
def claim_output(output: str | Path, *, settings: dict, overwrite: bool = False, resume: bool = False,
                 reads: dict[str, str | None] | None = None) -> Iterator[Claim]:
    """Hold `output` for one training run (see the module docstring); `reads` maps a name (e.g. "--base") to
    a model directory the run reads, which `output` may not be or lie inside. Settings that differ from the
    recorded run's refuse a resume."""
    if overwrite and resume:
        raise InputError("--overwrite and --resume exclude each other: resume continues a run, overwrite discards it")
    output = Path(output)
    settings = json.loads(json.dumps(settings))  # compared with the JSON record: tuples become lists
    if output.exists() and not output.is_dir():
        raise InputError(f"--output {output} is a file, not a directory")
    target = output.resolve()
    for name, path in (reads or {}).items():
        if path and Path(path).is_dir() and _inside(target, Path(path).resolve()):
            raise InputError(f"--output {output} is {'' if target == Path(path).resolve() else 'inside '}the model "
                             f"directory of {name} ({path}): training would write into a model it reads")
    if not is_main_process():
        yield _follow(output, target, overwrite, resume)
        return
    _recover(target)
    from filelock import FileLock, Timeout

    created = [p for p in (output.absolute(), *output.absolute().parents) if not p.exists()]
    lock_path = output / LOCK_NAME
    lock, new_lock, claim = None, False, None
    try:
        try:
            output.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise InputError(f"cannot create --output {output} ({err.strerror})") from None
        check_writable(output, "--output")
        new_lock = not lock_path.exists()
        lock = FileLock(str(lock_path), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise InputError(f"--output {output} is being written by another transfertune process (it holds "
                             f"{lock_path}): wait for it to finish or choose another --output") from None
        for stale in output.glob(STAGING_PREFIX + "*"):  # a save killed half-way; nobody else can hold it now
            _remove(stale)
        claim = _decide(output, target, settings, overwrite, resume)
    finally:
        if claim is None:  # refused: leave nothing behind
            if lock is not None and lock.is_locked:
                if new_lock:
                    lock_path.unlink(missing_ok=True)
                lock.release()
            for path in created:
                try:
                    path.rmdir()
                except OSError:
                    break
    try:
        yield claim
    finally:
        lock.release()


def _follow(output: Path, target: Path, overwrite: bool, resume: bool) -> Claim:
    """The claim of a process other than rank 0 (rank 0 decides and writes): the same directory, worked out from
    what rank 0 leaves unchanged while it claims."""
    nxt = _beside(target, NEXT_SUFFIX)
    staged = _staged_record(nxt) if resume else None
    if staged is not None:
        return Claim(nxt, staged["run_id"], latest_checkpoint(nxt, staged["run_id"]), target)
    if overwrite and output.is_dir() and _holds_a_run(output):
        return Claim(nxt, "", None, target)
    record = read_run(output) if resume and output.is_dir() else None
    ckpt = latest_checkpoint(output, record["run_id"]) if record else None
    return Claim(output, record["run_id"] if record else "", ckpt)


def _decide(output: Path, target: Path, settings: dict, overwrite: bool, resume: bool) -> Claim:
    record = read_run(output)
    ours, others = _owned(output, record)
    nxt = _beside(target, NEXT_SUFFIX)
    staged = _staged_record(nxt)
    if resume:
        if staged is not None:
            claim = _resume(nxt, staged, settings, f"the interrupted --overwrite run of {output} (in {nxt})",
                            target)
            _clear(_beside(target, OLD_SUFFIX))
            for stale in nxt.glob(STAGING_PREFIX + "*"):
                _remove(stale)
            return claim
        if record is None:
            if ours or others:
                raise InputError(f"--resume: {output} holds no transfertune training run to resume "
                                 f"({_listing(ours + others)}); choose a new --output")
            log.info("--resume: nothing to resume in %s yet; starting a new run", output)
        elif record.get("finished"):
            raise InputError(f"--resume: the training run in {output} has already finished; "
                             f"pass --overwrite to train again")
        else:
            claim = _resume(output, record, settings, f"the run in {output}")
            _clear_beside(target)
            return claim
    elif overwrite:
        if others:
            raise InputError(f"--overwrite removes only what transfertune wrote, and --output {output} also holds "
                             f"{_listing(others)}: move them away or choose another --output")
        staging = _holds_a_run(output)
        if staging:
            _check_swappable(output, target)
        _clear_beside(target)
        if staging:
            nxt.mkdir()
            return _new_run(nxt, settings, target)
        for path in ours:
            _remove(path)
        return _new_run(output, settings)
    elif ours or others:
        if record is not None and not record.get("finished"):
            why = "holds an unfinished training run: pass --resume to continue it or --overwrite to start again"
        elif (output / MARKER).is_file():
            why = "already holds a value model: pass --overwrite to replace it, or choose another --output"
            if staged is not None:
                why += f" (--resume continues the interrupted --overwrite run in {nxt})"
        else:
            why = f"is not empty ({_listing(ours + others)}): choose a new or empty --output"
        raise InputError(f"--output {output} {why}")
    _clear_beside(target)
    return _new_run(output, settings)


def _resume(directory: Path, record: dict, settings: dict, what: str, target: Path | None = None) -> Claim:
    old = record.get("settings") or {}
    changed = ["the training data differs" if k == "data_sha256" else f"{k} {old.get(k)!r} -> {v!r}"
               for k, v in settings.items() if old.get(k) != v]
    if changed:
        raise InputError(f"--resume: {what} was started with other settings "
                         f"({'; '.join(changed)}); resume with the same ones, or pass --overwrite")
    ckpt = latest_checkpoint(directory, record["run_id"])
    log.info("resuming run %s from %s", record["run_id"], ckpt or "the start (no complete checkpoint)")
    return Claim(directory, record["run_id"], ckpt, target)


def _new_run(directory: Path, settings: dict, target: Path | None = None) -> Claim:
    run = {"run_id": uuid.uuid4().hex, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "finished": False,
           "settings": settings, **({"staged": True} if target is not None else {})}
    write_atomic(directory / RUN_NAME, json.dumps(run, indent=2) + "\n")
    return Claim(directory, run["run_id"], target=target)


# -- replacing a finished directory (--overwrite) ----------------------------------------------------------
def _beside(target: Path, suffix: str) -> Path:
    return target.parent / f".{target.name}{suffix}"


def _holds_a_run(directory: Path) -> bool:
    """Whether `directory` holds a value model or checkpoints: what an --overwrite run keeps until it is done."""
    return (directory / MARKER).is_file() or any(
        CHECKPOINT.match(p.name) and p.is_dir() for p in directory.iterdir())


def _staged_record(nxt: Path) -> dict | None:
    """The record of an unfinished --overwrite run in `nxt` (a directory the swap moved aside is not one)."""
    try:
        record = read_run(nxt) if nxt.is_dir() else None
    except InputError:
        return None
    return record if record and record.get("staged") and not record.get("finished") else None


def _clear(path: Path) -> None:
    """Remove the leftover of an earlier --overwrite beside --output (a directory only transfertune names so)."""
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_dir() or path.is_symlink():
        raise InputError(f"{path} is in the way: --overwrite keeps the new or the old --output there while it "
                         f"replaces it; move it away")
    shutil.rmtree(path)


def _clear_beside(target: Path) -> None:
    for suffix in (NEXT_SUFFIX, OLD_SUFFIX):
        _clear(_beside(target, suffix))


def _check_swappable(output: Path, target: Path) -> None:
    """--overwrite renames a directory into the place of `target`: refuse, before anything is written, where
    that cannot work."""
    why = None
    if os.path.ismount(target):
        why = f"{output} is a mount point"
    elif _inside(Path.cwd().resolve(), target):
        why = f"the current directory is inside {output} (run from elsewhere)"
    else:
        try:
            check_writable(target.parent, "the directory above it,")
        except InputError as err:
            why = str(err)
    if why:
        raise InputError(f"--overwrite trains the new model beside --output {output} and renames it into place when "
                         f"it is saved (the old model stays until then), but {why}: remove the old model yourself "
                         f"or choose another --output")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux `renameat2(RENAME_EXCHANGE)`); False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def swap_in(new: Path, target: Path) -> None:
    """Put directory `new` in the place of `target`, then delete the old one. `target` is always one of the two
    whole directories: an atomic exchange where the system has one; elsewhere two renames, undone on an
    error, and completed or undone by the next claim (`_recover`) after a kill between them. The lock file of
    `target` is linked into `new` first, so the lock stays held through the swap."""
    new, target = Path(new), Path(target)
    if not target.exists():
        os.rename(new, target)
        return
    _, others = _owned(target, read_run(target))
    if others:
        raise InputError(f"--output {target} gained files transfertune did not write while training "
                         f"({_listing(others)}): the new model is in {new}; move them away and rename it into place "
                         f"yourself (the old model is untouched)")
    if (target / LOCK_NAME).exists() and not (new / LOCK_NAME).exists():
        try:
            os.link(target / LOCK_NAME, new / LOCK_NAME)
        except OSError:
            pass  # no hard links here: the lock is released a moment early
    old = _beside(target, OLD_SUFFIX)
    if old.exists() or old.is_symlink():
        _remove(old)
    if _exchange(new, target):
        os.rename(new, old)
    else:
        os.rename(target, old)
        try:
            os.rename(new, target)
        except BaseException:
            os.rename(old, target)
            raise
    _remove(old)


def _recover(target: Path) -> None:
    """Complete a swap a kill cut between its two renames (the new directory, if it finished), or undo it."""
    old, nxt = _beside(target, OLD_SUFFIX), _beside(target, NEXT_SUFFIX)
    if target.exists() or target.is_symlink() or not old.is_dir():
        return
    try:
        record = read_run(nxt) if nxt.is_dir() else None
    except InputError:
        record = None
    done = bool(record and record.get("finished")) and (nxt / MARKER).is_file()
    try:
        os.rename(nxt if done else old, target)
    except OSError:  # another claim got there first
        return
    log.warning("completed an interrupted replacement of %s" if done else "restored %s: replacing it was "
                "interrupted", target)
