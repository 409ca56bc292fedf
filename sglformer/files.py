"""Files that a crash or a full disk never leaves half written, and folders one process at a time.

Atomic replacement, durable appends and atomic links; one :class:`WriteError` for a write that failed,
naming the file, the cause and, for a full disk, the space needed and free; and an exclusive lock on a
folder (``run.lock``) that ends with the process holding it, however it ends."""
import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import re
import shlex
import shutil
import socket
import sys
import tempfile
from pathlib import Path

_logger = logging.getLogger(__name__)

LOCK_NAME = 'run.lock'
# What torch.save raises, as a RuntimeError, when the file system refuses its writes.
_TORCH_WRITE_FAILURE = re.compile(r'inline_container|PytorchStreamWriter|file write failed')


class WriteError(RuntimeError):
    """A file could not be written; the message names it and the cause."""


class FolderInUseError(RuntimeError):
    """Another live process holds the folder's lock; the message names it."""


def write_atomically(path, write):
    """Call ``write(binary_file)`` on a temporary file beside ``path``, flush it to the disk, then rename it
    over ``path``: a crash or a failed write at any moment leaves the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
    try:
        with os.fdopen(handle, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    sync_folder(path.parent)


def write_file(path, data: bytes, advice=None):
    """``data`` written to ``path`` (its folders made) by :func:`write_atomically`; a failure is one
    :class:`WriteError` (``advice``: what to do when the disk is full)."""
    with writing(path, len(data), advice):
        write_atomically(path, lambda f: f.write(data))


def sync_folder(folder):
    """Flush a folder's entries (renames, new links) to the disk, so that they survive a power cut."""
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def append_durably(path, text, advice=None):
    """Append ``text`` and flush it to the disk; a failed write is cut off again, so that no half row stays."""
    path = Path(path)
    size = path.stat().st_size if path.exists() else None
    try:
        with open(path, 'a', encoding='utf-8', newline='') as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        with contextlib.suppress(OSError):
            if size is None:
                path.unlink()
            else:
                os.truncate(path, size)
        raise write_error(path, exc, len(text.encode('utf-8')), advice) from exc


def link_atomically(source, target):
    """``target`` becomes a copy of ``source`` (a hard link where possible) without a moment in which
    it is missing or half written."""
    tmp = target.with_name(f'.{target.name}.link.tmp')
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(source, tmp)
        except OSError:  # file systems without hard links
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sync_folder(target.parent)


@contextlib.contextmanager
def writing(path, needed=None, advice=None):
    """Turn a failed write to ``path`` (an OSError, or torch.save's RuntimeError) into one :class:`WriteError`;
    ``needed``: the bytes being written, ``advice``: what to do when the disk is full."""
    try:
        yield
    except OSError as exc:
        raise write_error(path, exc, needed, advice) from exc
    except RuntimeError as exc:
        if isinstance(exc, WriteError) or not _TORCH_WRITE_FAILURE.search(str(exc)):
            raise
        raise write_error(path, exc, needed, advice) from exc


def write_error(path, exc, needed=None, advice=None):
    free = shutil.disk_usage(_existing_parent(path)).free
    code = getattr(exc, 'errno', None)
    if code in (errno.ENOSPC, errno.EDQUOT) or (code is None and needed is not None and needed > free):
        room = 'disk quota exceeded' if code == errno.EDQUOT else 'no space left on the device'
        amounts = (f'about {_size(needed)} needed, ' if needed is not None else '') + f'{_size(free)} free'
        return WriteError(f'could not write {path}: {room} ({amounts}); '
                          f"{advice or 'free some space and run the command again'}")
    cause = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).strip().splitlines()[0]
    return WriteError(f'could not write {path}: {cause}')


def _existing_parent(path):
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path


def _size(count):
    for unit in ('bytes', 'KiB', 'MiB', 'GiB'):
        if count < 1024:
            return f'{count:.0f} {unit}' if unit == 'bytes' else f'{count:.1f} {unit}'
        count /= 1024
    return f'{count:.1f} TiB'


def _lock_owner(handle):
    """The record a lock file holds (pid, host, started, command), or {} where it holds none."""
    os.lseek(handle, 0, os.SEEK_SET)
    try:
        record = json.loads(os.read(handle, 1 << 16).decode('utf-8'))
    except (ValueError, UnicodeDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


def _in_use(folder, owner):
    who = (f"pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}: {owner.get('command')}"
           if owner else 'a process that has not written its name into the lock yet')
    return FolderInUseError(f'{folder} is in use by another run ({who}); wait for it to end, or write this run to '
                            'another folder (--experiment NAME or --output DIR)')


def _try_lock(handle):
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def check_unlocked(folder):
    """Refuse a folder whose lock a live process holds, without writing anything."""
    try:
        handle = os.open(folder / LOCK_NAME, os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):
        return
    try:
        if not _try_lock(handle):
            raise _in_use(folder, _lock_owner(handle))
    finally:
        os.close(handle)  # also releases the probe's lock


def lock_folder(folder):
    """An exclusive flock on ``folder/run.lock``; the operating system releases it when the process ends,
    however it ends, so a lock file without a live holder is simply taken over."""
    lock = folder / LOCK_NAME
    with writing(lock):
        while True:
            handle = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            if not _try_lock(handle):
                owner = _lock_owner(handle)
                os.close(handle)
                raise _in_use(folder, owner)
            try:
                if os.path.samestat(os.fstat(handle), os.stat(lock)):
                    break
            except FileNotFoundError:
                pass
            os.close(handle)  # its holder removed the file between our open and lock: lock the new one
        previous = _lock_owner(handle)
        if previous:
            _logger.warning('%s: taking over the lock of pid %s on %s (started %s), which no longer runs', folder,
                            previous.get('pid'), previous.get('host'), previous.get('started'))
        record = {'pid': os.getpid(), 'host': socket.gethostname(),
                  'started': datetime.datetime.now().isoformat(timespec='seconds'), 'command': shlex.join(sys.argv)}
        os.ftruncate(handle, 0)
        os.pwrite(handle, json.dumps(record).encode('utf-8'), 0)
        os.fsync(handle)
    return handle


def unlock_folder(folder, handle):
    """Remove the lock file while still holding it, then release it (a process that opened the file in
    between notices that it is gone and locks a new one)."""
    with contextlib.suppress(OSError):
        (folder / LOCK_NAME).unlink()
    os.close(handle)
