"""What a training run writes (docs/training.md#run-folders): checkpoints in the container and with the file
names of the authors' script for its dataset (``timm``, ``dvs`` or ``mae``), ``summary.csv``, ``log.txt``,
``args.yaml`` and TensorBoard events. Only the main process of a run opens its folder.

A folder never loses data: a run holds it locked (``run.lock``), refuses to write over another run,
writes every file atomically, and turns a failed write into one :class:`RunFolderError`. The latest
checkpoint is the commit point of an epoch: the epoch's log rows come before it, its copies (best,
numbered, final) and evictions after it, so that resuming from it completes whatever a crash cut short.
The ``timm`` layout follows timm's CheckpointSaver's rules without calling it, because the saver unlinks
``last.pth.tar`` and ``model_best.pth.tar`` before replacing them and evicts a file before linking its
successor: resumed after a crash between those steps it keeps a stale best file or ranks without an epoch.
"""
import contextlib
import csv
import datetime
import errno
import fcntl
import io
import json
import logging
import os
import re
import shlex
import shutil
import socket
import sys
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from timm.utils import unwrap_model

from .checkpoint import read_checkpoint, save_checkpoint, sync_folder, write_atomically

_logger = logging.getLogger(__name__)

SUMMARY_FIELDS = ('epoch', 'train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'lr', 'img_per_s')
LOG_FILES = ('summary.csv', 'log.txt')
LOCK_NAME = 'run.lock'
TIMM_TEMPORARY = 'tmp.pth.tar'  # what timm's CheckpointSaver writes before renaming it to last.pth.tar
_TORCH_WRITE_FAILURE = re.compile(r'inline_container|PytorchStreamWriter|file write failed')


class RunFolderError(RuntimeError):
    """An expected problem with a run folder: in use, holding another run, or a write that failed."""


@dataclass(frozen=True)
class CheckpointLayout:
    name: str
    last: str  # written after every epoch; what resuming reads
    best: str  # may contain {epoch}
    numbered: str = None  # the `checkpoint_hist` best epochs by top-1
    final: str = None  # written after the last epoch
    best_window: int = None  # only epochs this close to the end write `best`
    checkpoint_hist: int = None  # default number of `numbered` files kept
    weights_key: str = 'model'
    scaler_key: str = 'scaler'
    log_names: tuple = ()  # (ours, the authors') key pairs renamed in log.txt

    @property
    def initial_best(self):
        """The best before the first epoch: the authors' DVS and ImageNet scripts start from 0."""
        return None if self.name == 'timm' else {'top1': 0.0, 'top5': 0.0, 'epoch': None}

    def container(self, epoch, top1, best, model, optimizer, scheduler, scaler, args, saver=None):
        weights = unwrap_model(model).state_dict()
        if self.name == 'timm':
            state = {'epoch': epoch, 'arch': getattr(args, 'model', type(model).__name__.lower()),
                     'state_dict': weights, 'optimizer': optimizer.state_dict(), 'version': 2, 'args': args,
                     'metric': top1, 'saver': saver}
        elif self.name == 'dvs':
            state = {'model': weights, 'optimizer': optimizer.state_dict(),
                     'lr_scheduler': scheduler.state_dict() if scheduler is not None else {}, 'epoch': epoch,
                     'args': args, 'max_test_acc1': best['top1'], 'test_acc5_at_max_test_acc1': best['top5']}
        else:
            state = {'model': weights, 'optimizer': optimizer.state_dict(), 'epoch': epoch, 'args': args,
                     'max_accuracy': best['top1'], 'max_accuracy_epoch': best['epoch']}
        if scaler is not None:
            state[self.scaler_key] = scaler.state_dict()
        return state

    def recorded_best(self, checkpoint):
        """``{'top1', 'top5', 'epoch'}`` of the best epoch up to a checkpoint of this layout, as far as it
        records them (None where it records none)."""
        if self.name == 'dvs':
            return {'top1': checkpoint.get('max_test_acc1', 0.0),
                    'top5': checkpoint.get('test_acc5_at_max_test_acc1', 0.0), 'epoch': None}
        if self.name == 'mae':
            return {'top1': checkpoint.get('max_accuracy', 0.0), 'top5': None,
                    'epoch': checkpoint.get('max_accuracy_epoch')}
        saver = checkpoint.get('saver')
        if saver is None:  # files of timm before 1.x, as the authors': only that epoch's metric
            metric = checkpoint.get('metric')
            return None if metric is None else {'top1': metric, 'top5': None, 'epoch': None}
        epoch, metric = saver['pending']
        if metric is not None and (saver['best_metric'] is None or metric > saver['best_metric']):
            return {'top1': metric, 'top5': None, 'epoch': epoch}
        best = saver['best_metric']
        return None if best is None else {'top1': best, 'top5': None, 'epoch': saver['best_epoch']}


LAYOUTS = {
    'timm': CheckpointLayout('timm', 'last.pth.tar', 'model_best.pth.tar', numbered='checkpoint-{epoch}.pth.tar',
                             checkpoint_hist=10, weights_key='state_dict', scaler_key='amp_scaler'),
    'dvs': CheckpointLayout('dvs', 'checkpoint_latest.pth', 'checkpoint_max_test_acc1.pth',
                            final='checkpoint_{epoch}.pth'),
    'mae': CheckpointLayout('mae', 'checkpoint-last.pth', 'checkpoint-{epoch}.pth', best_window=20, log_names=(
        ('lr', 'train_lr'), ('img_per_s', 'train_img_per_s'), ('grad_norm', 'train_grad_norm'),
        ('eval_loss', 'test_loss'), ('eval_top1', 'test_acc1'), ('eval_top5', 'test_acc5'))),
}


def layout_named(layout):
    """A :class:`CheckpointLayout`, given as itself or by its name in ``LAYOUTS``."""
    if isinstance(layout, CheckpointLayout):
        return layout
    if layout not in LAYOUTS:
        raise RunFolderError(f"unknown checkpoint format {layout!r}; one of {', '.join(LAYOUTS)}")
    return LAYOUTS[layout]


def resume_state(checkpoint, layout, source='the checkpoint'):
    """What a run continues from: ``epoch`` (the checkpoint's), ``start_epoch``, ``best``
    (``{'top1', 'top5', 'epoch'}`` or None) and the ``optimizer``, ``scheduler`` and ``scaler`` states
    (None where the checkpoint has none)."""
    layout = layout_named(layout)
    missing = [key for key in ('epoch', 'optimizer', layout.weights_key) if key not in checkpoint]
    if missing:
        raise RunFolderError(f"{source} has no {', '.join(map(repr, missing))}, so it is not a training checkpoint "
                             f"of the {layout.name} format; to start from its weights, pass it as "
                             '--initial-checkpoint instead of --resume')
    best = layout.recorded_best(checkpoint) or layout.initial_best
    return {'epoch': checkpoint['epoch'], 'start_epoch': checkpoint['epoch'] + 1, 'best': best,
            'optimizer': checkpoint['optimizer'], 'scheduler': checkpoint.get('lr_scheduler') or None,
            'scaler': checkpoint.get(layout.scaler_key)}


class RunFolder:
    """A run's folder, locked for the lifetime of the run; open it with :meth:`open`, and every epoch call
    :meth:`log_epoch` and then :meth:`save`."""

    def __init__(self, path, layout, settings, num_epochs, keep, lock):
        self.path = path
        self.layout = layout
        self.args = Namespace(**settings)  # what the checkpoints record, as the authors' argparse namespace
        self.num_epochs = num_epochs
        self.keep = keep
        self.best = layout.initial_best  # {'top1', 'top5', 'epoch'} of the best epoch so far, or None
        self.history = []  # (file name, top-1) of the kept numbered checkpoints, best first
        self.writer = None
        self._lock = lock
        self._logged_epoch = None

    @classmethod
    def open(cls, path, layout, settings, *, num_epochs, resume_from=None, checkpoint=None, checkpoint_hist=None,
             log_dir=None):
        """Lock the folder ``path`` for a run of ``num_epochs`` epochs that writes the checkpoint layout
        ``layout`` (one of ``LAYOUTS`` or its name) and records ``settings`` in ``args.yaml`` and its checkpoints.

        A run resumed from ``resume_from`` (``checkpoint``: its contents where already read) continues in
        that file's own folder when ``path`` is it, which only its latest checkpoint may do, or in a new or
        empty folder that receives the history up to the checkpoint's epoch. Everything is checked before
        anything is written.
        """
        layout = layout_named(layout)
        path = Path(path)
        if resume_from is not None and checkpoint is None:
            checkpoint = read_checkpoint(resume_from)
        keep, args_text = _validated(layout, settings, num_epochs, resume_from, checkpoint, checkpoint_hist)
        source = _resume_source(path, layout, resume_from, checkpoint)
        in_place = source is not None and source == path.resolve()
        if not in_place:
            _refuse_if_holds_run(path, layout, resume_from, source)
        created = not path.exists()
        with _writing(path):
            path.mkdir(parents=True, exist_ok=True)
        try:
            folder = cls(path, layout, settings, num_epochs, keep, _take_lock(path))
        except BaseException:
            _remove_if_created(path, created)
            raise
        try:
            if not in_place:  # again under the lock: another run may have started in between
                _refuse_if_holds_run(path, layout, resume_from, source)
            folder._remove_temporaries()
            if checkpoint is not None:
                folder._continue(checkpoint, source, in_place)
            folder._write_settings(settings, args_text, in_place)
            folder._open_writer(log_dir, None if checkpoint is None else checkpoint['epoch'] + 1)
        except BaseException:
            folder.close()
            _remove_if_created(path, created)
            raise
        return folder

    @property
    def last(self):
        return self.path / self.layout.last

    def log_epoch(self, row, extra=None):
        """One row of ``summary.csv``, one JSON line of ``log.txt`` and the TensorBoard scalars; call it
        before :meth:`save` of the same epoch, so that the checkpoint never runs ahead of its history."""
        summary = self.path / 'summary.csv'
        text = io.StringIO()
        out = csv.DictWriter(text, fieldnames=SUMMARY_FIELDS, lineterminator='\n')
        if not summary.exists():
            out.writeheader()
        out.writerow({k: (f'{v:.6g}' if isinstance(v, float) else v) for k, v in row.items()})
        _append(summary, text.getvalue())
        names = dict(self.layout.log_names)
        line = json.dumps({names.get(k, k): v for k, v in dict(row, **(extra or {})).items()})
        _append(self.path / 'log.txt', line + '\n')
        with _writing(Path(self.writer.log_dir)):
            for key, value in row.items():
                if key != 'epoch':
                    self.writer.add_scalar(key, value, row['epoch'])
            self.writer.flush()
        self._logged_epoch = row['epoch']

    def save(self, epoch, top1, top5, *, model, optimizer, scheduler=None, scaler=None):
        """Write the epoch's checkpoints: the latest, then the best, numbered and final copies it earns,
        then remove the numbered ones it displaces. Returns True where the epoch is a new best."""
        if self._logged_epoch != epoch:
            raise ValueError(f'log_epoch() of epoch {epoch} must come before save(): a checkpoint written before '
                             'its log rows would leave them out of a resumed run')
        layout = self.layout
        new_best = self.best is None or top1 > self.best['top1']
        best = {'top1': top1, 'top5': top5, 'epoch': epoch} if new_best else self.best
        saver, history, evicted = None, self.history, []
        if layout.numbered:
            saver = {'checkpoint_files': list(self.history), 'best_epoch': self.best and self.best['epoch'],
                     'best_metric': self.best and self.best['top1'], 'pending': (epoch, top1)}
            history, evicted = _ranked(self.history, (layout.numbered.format(epoch=epoch), top1), self.keep)
        state = layout.container(epoch, top1, best, model, optimizer, scheduler, scaler, self.args, saver)
        with _writing(self.last, needed=_tensor_bytes(state)):
            save_checkpoint(state, self.last)
        self.best, self.history = best, history
        self._complete_epoch(epoch, new_best, evicted)
        return new_best

    def close(self):
        """Close the TensorBoard writer and release the lock; also on errors, through ``with``."""
        if self._lock is None:
            return
        try:
            if self.writer is not None:
                with _writing(Path(self.writer.log_dir)):
                    self.writer.close()
        finally:
            _release_lock(self.path, self._lock)
            self._lock = None

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        try:
            self.close()
        except RunFolderError as exc:
            if kind is None:
                raise
            _logger.warning('%s', exc)  # the error in flight says more

    def _complete_epoch(self, epoch, new_best, evicted):
        """The copies of the latest checkpoint that ``epoch`` earns, then the evictions it causes."""
        layout = self.layout
        copies = []
        if layout.numbered and any(name == layout.numbered.format(epoch=epoch) for name, _ in self.history):
            copies.append(layout.numbered.format(epoch=epoch))
        if new_best and (layout.best_window is None or epoch > self.num_epochs - layout.best_window):
            copies.append(layout.best.format(epoch=epoch))
        if layout.final and epoch == self.num_epochs - 1:
            copies.append(layout.final.format(epoch=epoch))
        for name in copies:
            target = self.path / name
            if not (target.exists() and os.path.samefile(self.last, target)):
                with _writing(target, needed=self.last.stat().st_size):
                    _link_atomically(self.last, target)
        for name, _ in evicted:
            try:
                (self.path / name).unlink(missing_ok=True)
            except OSError as exc:
                _logger.warning('could not remove %s, which the checkpoint history no longer keeps: %s',
                                self.path / name, exc.strerror)

    def _continue(self, checkpoint, source, in_place):
        """Take over the best and the numbered history of the resumed run; in its own folder, also drop the
        rows after the checkpoint and complete the checkpoint's epoch; in a new folder, copy the rows."""
        epoch = checkpoint['epoch']
        self.best = resume_state(checkpoint, self.layout)['best']
        if not in_place:
            for name in LOG_FILES:
                if (source / name).exists():
                    _keep_rows_up_to(source / name, epoch, self.path / name)
            _logger.info('continuing the run of %s (epoch %d) in %s, with its history', source, epoch, self.path)
            return
        for name in LOG_FILES:
            if (self.path / name).exists():
                _keep_rows_up_to(self.path / name, epoch, self.path / name)
        new_best = self._best_set_at(epoch)
        evicted = []
        if self.layout.numbered and checkpoint.get('saver') is None:
            _logger.warning('%s records no checkpoint history: the numbered checkpoints already in %s stay, and '
                            'the ranking starts afresh', self.last, self.path)
        elif self.layout.numbered:
            saver = checkpoint['saver']
            before = [tuple(item) for item in saver['checkpoint_files'] if (self.path / item[0]).exists()]
            self.history, evicted = _ranked(before, (self.layout.numbered.format(epoch=epoch), saver['pending'][1]),
                                            self.keep)
        self._complete_epoch(epoch, new_best, evicted)

    def _best_set_at(self, epoch):
        """Whether the resumed checkpoint's ``epoch`` is a new best. Where the checkpoint does not record the
        best's epoch, the best file tells: it is older when it records a lower top-1 (or is missing)."""
        if self.best is None or self.best['epoch'] is not None:
            return self.best is not None and self.best['epoch'] == epoch
        if '{epoch}' in self.layout.best:
            return False
        best_file = self.path / self.layout.best
        recorded = self.layout.recorded_best(read_checkpoint(best_file)) if best_file.exists() else None
        floor = recorded or self.layout.initial_best
        if floor is not None and floor['top1'] >= self.best['top1']:
            self.best = floor
            return False
        return True

    def _remove_temporaries(self):
        """Files a killed writer left: ours (``.<name>.*.tmp``) and timm's saver's (``tmp.pth.tar``)."""
        orphans = sorted(self.path.glob('.*.tmp')) + sorted(self.path.glob(TIMM_TEMPORARY))
        for orphan in orphans:
            with _writing(orphan):
                orphan.unlink(missing_ok=True)
        if orphans:
            _logger.info('removed %s, left by an interrupted write', ', '.join(p.name for p in orphans))

    def _write_settings(self, settings, args_text, in_place):
        """``args.yaml``; a run continued in its own folder keeps the one its first start wrote."""
        target = self.path / 'args.yaml'
        if in_place and target.exists():
            first = yaml.safe_load(target.read_text()) or {}
            changed = sorted(k for k in set(first) | set(settings) if k != 'resume' and first.get(k) != settings.get(k))
            if changed:
                _logger.info('continuing with other settings than %s records: %s', target, ', '.join(changed))
            return
        with _writing(target, needed=len(args_text)):
            write_atomically(target, lambda f: f.write(args_text.encode()))

    def _open_writer(self, log_dir, purge_step):
        """TensorBoard; a resumed run hides the events a crashed one wrote after its checkpoint (purge_step)."""
        from torch.utils.tensorboard import SummaryWriter  # slow to import; only the main process writes
        log_dir = Path(log_dir or self.path)
        with _writing(log_dir):
            self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


def _remove_if_created(path, created):
    """Undo the folder a refused ``open`` made, where it is still empty."""
    if created:
        with contextlib.suppress(OSError):
            path.rmdir()


def _validated(layout, settings, num_epochs, resume_from, checkpoint, checkpoint_hist):
    """The number of numbered checkpoints to keep and the text of ``args.yaml``, after checking the arguments."""
    if resume_from is None and checkpoint is not None:
        raise ValueError('checkpoint without resume_from: pass the path of the resumed file too')
    if not isinstance(num_epochs, int) or num_epochs < 1:
        raise ValueError(f'num_epochs must be a positive integer, got {num_epochs!r}')
    keep = layout.checkpoint_hist if checkpoint_hist is None else checkpoint_hist
    if layout.numbered and (not isinstance(keep, int) or keep < 1):
        raise RunFolderError(f'--checkpoint-hist {checkpoint_hist}: keep at least 1 numbered checkpoint')
    if checkpoint is not None:
        resume_state(checkpoint, layout, source=str(resume_from))
    return keep, yaml.safe_dump(dict(settings), sort_keys=True)


def _resume_source(path, layout, resume_from, checkpoint):
    """The resolved folder of the resumed file (None for a new run), after refusing what would overwrite."""
    if path.exists() and not path.is_dir():
        raise RunFolderError(f'{path} is a file; the run folder must be a folder (or not exist yet)')
    _check_unlocked(path)
    if resume_from is None:
        return None
    resume_from = Path(resume_from)
    source = resume_from.resolve().parent
    if source == path.resolve() and resume_from.name != layout.last:
        raise RunFolderError(
            f"cannot continue in {path} from {resume_from} (epoch {checkpoint['epoch']}): only the folder's latest "
            f'checkpoint, {layout.last}, continues in place; from any other file the run would overwrite what the '
            'folder holds after that epoch. Resume from it into a new folder (--experiment NAME or --output DIR)')
    return source


def _refuse_if_holds_run(path, layout, resume_from, source):
    held = _run_files(path)
    if not held:
        return
    held = ', '.join(held[:4]) + (f' and {len(held) - 4} more' if len(held) > 4 else '')
    if resume_from is None:
        hint = (f'continue it with --resume {path / layout.last}, or ' if (path / layout.last).exists() else '')
        raise RunFolderError(f'{path} already holds a run ({held}), which a new run would overwrite: '
                             f'{hint}start the new run in another folder (--experiment NAME or --output DIR)')
    raise RunFolderError(
        f'cannot continue the run of {source} from {resume_from} in {path}: {path} already holds another run '
        f'({held}). Continue into a new or empty folder, or in {source} itself from its '
        f'{layout.last}')


def _run_files(folder):
    """The files that show a run in ``folder``: checkpoints, logs, ``args.yaml``."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir()
                  if p.name in (*LOG_FILES, 'args.yaml') or (p.name.endswith(('.pth', '.pth.tar'))
                                                             and p.name != TIMM_TEMPORARY))


def _ranked(history, entry, keep):
    """timm's CheckpointSaver rule: the kept ``(name, top-1)`` files best first and those displaced.
    A full history takes ``entry`` only when it beats the worst; ties keep the earlier (stable sort)."""
    if len(history) >= keep and not entry[1] > history[-1][1]:
        return history, []
    kept, evicted = (history, []) if len(history) < keep else (history[:keep - 1], history[keep - 1:])
    return sorted([*kept, entry], key=lambda item: item[1], reverse=True), evicted


def _keep_rows_up_to(source, epoch, target):
    """Write to ``target`` the rows of ``source`` (summary.csv or log.txt) up to ``epoch``; rows after it
    belong to epochs whose checkpoint was never written, and a row cut short by a crash is dropped too."""
    lines = source.read_text(encoding='utf-8').splitlines(keepends=True)
    head, rows, column = [], lines, None  # log.txt: JSON lines
    if source.name == 'summary.csv' and lines:
        header = next(csv.reader([lines[0]]))
        head, rows, column = lines[:1], lines[1:], header.index('epoch') if 'epoch' in header else 0
    kept = []
    for line in rows:
        with contextlib.suppress(ValueError, KeyError, IndexError, TypeError, StopIteration):
            if line.endswith('\n') and _row_epoch(line, column) <= epoch:
                kept.append(line)
    if source == target and len(kept) == len(rows):
        return
    if len(kept) < len(rows):
        _logger.info('%s: left out %d rows after epoch %d', target, len(rows) - len(kept), epoch)
    text = ''.join(head + kept).encode('utf-8')
    with _writing(target, needed=len(text)):
        write_atomically(target, lambda f: f.write(text))


def _row_epoch(line, column):
    """The epoch of a summary.csv row (its ``column``) or of a log.txt line (``column`` None)."""
    return int(json.loads(line)['epoch'] if column is None else next(csv.reader([line]))[column])


def _append(path, text):
    """Append ``text`` durably; a failed write is cut off again, so that no half row stays."""
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
        raise _write_error(path, exc, len(text.encode('utf-8'))) from exc


def _link_atomically(source, target):
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
def _writing(path, needed=None):
    """Turn a failed write to ``path`` (OSError, or torch.save's RuntimeError) into one RunFolderError."""
    try:
        yield
    except RunFolderError:
        raise
    except OSError as exc:
        raise _write_error(path, exc, needed) from exc
    except RuntimeError as exc:
        if not _TORCH_WRITE_FAILURE.search(str(exc)):
            raise
        raise _write_error(path, exc, needed) from exc


def _write_error(path, exc, needed):
    free = shutil.disk_usage(_existing_parent(path)).free
    code = getattr(exc, 'errno', None)
    if code in (errno.ENOSPC, errno.EDQUOT) or (code is None and needed is not None and needed > free):
        room = 'disk quota exceeded' if code == errno.EDQUOT else 'no space left on the device'
        amounts = (f'about {_size(needed)} needed, ' if needed is not None else '') + f'{_size(free)} free'
        return RunFolderError(f"could not write {path}: {room} ({amounts}); the run folder's earlier files are "
                              'intact: free some space (or choose another --output) and resume')
    cause = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).strip().splitlines()[0]
    return RunFolderError(f'could not write {path}: {cause}')


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


def _tensor_bytes(obj):
    """The bytes of the tensors in a nested container: what torch.save needs, give or take a little."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


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
    return RunFolderError(f'{folder} is in use by another run ({who}); wait for it to end, or write this run to '
                          'another folder (--experiment NAME or --output DIR)')


def _try_lock(handle):
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _check_unlocked(folder):
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


def _take_lock(folder):
    """An exclusive flock on ``folder/run.lock``; the operating system releases it when the process ends,
    however it ends, so a lock file without a live holder is simply taken over."""
    lock = folder / LOCK_NAME
    with _writing(lock):
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


def _release_lock(folder, handle):
    """Remove the lock file while still holding it, then release it (a process that opened the file in
    between notices that it is gone and locks a new one)."""
    with contextlib.suppress(OSError):
        (folder / LOCK_NAME).unlink()
    os.close(handle)
