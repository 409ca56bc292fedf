"""The run folder (docs/training.md#run-folders): its name, its lock, and the files a training run writes
into it: checkpoints in one of the authors' layouts (:mod:`sglformer.checkpoint`), ``summary.csv``,
``log.txt``, ``args.yaml`` and TensorBoard events. Only the main process of a run opens its folder.

A folder never loses data: a run holds it locked (``run.lock``), refuses to write over another run's
checkpoints, writes every file atomically, and turns a failed write into one
:class:`sglformer.files.WriteError`. The latest checkpoint is the commit point of an epoch: the epoch's
log rows come before it, its copies (best, numbered, final) and evictions after it, so that resuming from
it completes whatever a crash cut short. The ``timm`` layout follows timm's CheckpointSaver's rules without
calling it, because the saver unlinks ``last.pth.tar`` and ``model_best.pth.tar`` before replacing them and
evicts a file before linking its successor: resumed after a crash between those steps it keeps a stale
best file or ranks without an epoch.
"""
import contextlib
import csv
import datetime
import io
import json
import logging
import os
from argparse import Namespace
from pathlib import Path

import torch
import yaml

from .checkpoint import checkpoint_layout, ranked, read_checkpoint, resume_state, save_checkpoint
from .config import COMMAND_LINE
from .files import append_durably, check_unlocked, link_atomically, lock_folder, unlock_folder, write_file, writing

_logger = logging.getLogger(__name__)

SUMMARY_FIELDS = ('epoch', 'train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'lr', 'img_per_s')
LOG_FILES = ('summary.csv', 'log.txt')
TIMM_TEMPORARY = 'tmp.pth.tar'  # what timm's CheckpointSaver writes before renaming it to last.pth.tar
NAME_MAX = 255  # bytes in one file name on Linux file systems
# Recorded settings that change the numbers of a resumed run, not what it does: a difference is a warning.
ENVIRONMENT = ('device', 'threads', 'torch_version', 'spikingjelly_version')
# Recorded values that say where the run is and what it continues from, not how it trains.
NOT_SETTINGS = ('resume', 'initial_checkpoint', 'experiment', 'output', 'changes')


class RunFolderError(RuntimeError):
    """An expected problem with a run folder: in use, holding another run, or a name it cannot have."""


class RunFolder:
    """A run's folder, locked for the lifetime of the run; open it with :meth:`open`, and every epoch call
    :meth:`log_epoch` and then :meth:`save`."""

    def __init__(self, path, layout, cfg, num_epochs, keep, lock):
        self.path = path
        self.layout = layout
        self.args = Namespace(**cfg.to_dict())  # what the checkpoints record, as the authors' argparse namespace
        self.num_epochs = num_epochs
        self.keep = keep
        self.best = layout.initial_best  # {'top1', 'top5', 'epoch'} of the best epoch so far, or None
        self.history = []  # (file name, top-1) of the kept numbered checkpoints, best first
        self.writer = None
        self._lock = lock
        self._logged_epoch = None

    @classmethod
    def open(cls, path, layout, cfg, *, num_epochs, resume_from=None, checkpoint=None, checkpoint_hist=None,
             log_dir=None):
        """Lock the folder ``path`` for a run of ``num_epochs`` epochs that writes the checkpoint layout
        ``layout`` (a name of :data:`sglformer.checkpoint.LAYOUTS`) and records the configuration ``cfg`` in
        ``args.yaml`` and its checkpoints.

        A run resumed from ``resume_from`` (``checkpoint``: its contents, read before) continues in that
        file's own folder when ``path`` is it, which only its latest checkpoint may do, or in a folder
        without checkpoints, which receives the history up to the checkpoint's epoch. A folder without
        checkpoints holds nothing to lose: a new run starts (again) in it. Everything is checked before
        anything is written, and again under the lock.
        """
        layout = checkpoint_layout(layout)
        path = Path(path)
        if resume_from is not None and checkpoint is None:
            checkpoint = read_checkpoint(resume_from)
        keep = _validated(layout, num_epochs, resume_from, checkpoint, checkpoint_hist)
        source = _resume_source(path, layout, resume_from, checkpoint)
        in_place = source is not None and source == path.resolve()
        if not in_place:
            _refuse_if_holds_run(path, layout, resume_from, source)
        created = not path.exists()
        with writing(path):
            path.mkdir(parents=True, exist_ok=True)
        try:
            folder = cls(path, layout, cfg, num_epochs, keep, lock_folder(path))
        except BaseException:
            _remove_if_created(path, created)
            raise
        try:
            if in_place:  # another run may have moved the folder on since the checkpoint was read
                _refuse_if_moved_on(path, resume_from, checkpoint)
            else:
                _refuse_if_holds_run(path, layout, resume_from, source)
            folder._remove_temporaries()
            if checkpoint is not None:
                folder._continue(checkpoint, source, in_place)
            else:
                folder._drop_rows_without_checkpoint()
            folder._write_settings(cfg.to_dict(), in_place and checkpoint['epoch'] + 1)
            folder._open_writer(log_dir, None if checkpoint is None else checkpoint['epoch'] + 1)
        except BaseException:
            folder.close()
            _remove_if_created(path, created)
            raise
        return folder

    @property
    def last(self):
        return self.path / self.layout.last

    def writing(self, path, needed=None):
        """:func:`sglformer.files.writing` with the advice for a full disk that fits this run."""
        return writing(path, needed, self._full_disk_advice())

    def _full_disk_advice(self):
        if self.last.exists():
            return ("the run folder's earlier files are intact: free some space (or choose another --output) and "
                    f'resume with --resume {self.last}')
        return 'nothing was saved yet: free some space (or choose another --output) and run the same command again'

    def log_epoch(self, row, extra=None):
        """One row of ``summary.csv``, one JSON line of ``log.txt`` and the TensorBoard scalars; call it
        before :meth:`save` of the same epoch, so that the checkpoint never runs ahead of its history."""
        summary = self.path / 'summary.csv'
        text = io.StringIO()
        out = csv.DictWriter(text, fieldnames=SUMMARY_FIELDS, lineterminator='\n')
        if not summary.exists():
            out.writeheader()
        out.writerow({k: (f'{v:.6g}' if isinstance(v, float) else v) for k, v in row.items()})
        with self.writing(summary):
            append_durably(summary, text.getvalue())
        names = dict(self.layout.log_names)
        line = json.dumps({names.get(k, k): v for k, v in dict(row, **(extra or {})).items()})
        with self.writing(self.path / 'log.txt'):
            append_durably(self.path / 'log.txt', line + '\n')
        with self.writing(Path(self.writer.log_dir)):
            for key, value in row.items():
                if key != 'epoch':
                    self.writer.add_scalar(key, value, row['epoch'])
            self.writer.flush()
        self._logged_epoch = row['epoch']

    def save(self, epoch, top1, top5, *, model, optimizer, scheduler=None, scaler=None, ema=None):
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
            history, evicted = ranked(self.history, (layout.numbered.format(epoch=epoch), top1), self.keep)
        state = layout.container(epoch, top1, best, model, optimizer, scheduler, scaler, self.args, saver, ema)
        with self.writing(self.last, needed=_tensor_bytes(state)):
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
                with self.writing(Path(self.writer.log_dir)):
                    self.writer.close()
        finally:
            unlock_folder(self.path, self._lock)
            self._lock = None

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        try:
            self.close()
        except RuntimeError as exc:
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
                with self.writing(target, needed=self.last.stat().st_size):
                    link_atomically(self.last, target)
        for name, _ in evicted:
            try:
                (self.path / name).unlink(missing_ok=True)
            except OSError as exc:
                _logger.warning('could not remove %s, which the checkpoint history no longer keeps: %s',
                                self.path / name, exc.strerror)

    def _continue(self, checkpoint, source, in_place):
        """Take over the best and the numbered history of the resumed run; in its own folder, also drop the
        rows after the checkpoint and complete the checkpoint's epoch; elsewhere, copy the rows."""
        epoch = checkpoint['epoch']
        self.best = resume_state(checkpoint, self.layout)['best']
        if not in_place:
            for name in LOG_FILES:
                (self.path / name).unlink(missing_ok=True)
                if (source / name).exists():
                    self._keep_rows_up_to(source / name, epoch, self.path / name)
            _logger.info('continuing the run of %s (epoch %d) in %s, with its history', source, epoch, self.path)
            return
        for name in LOG_FILES:
            if (self.path / name).exists():
                self._keep_rows_up_to(self.path / name, epoch, self.path / name)
        new_best = self._best_set_at(epoch)
        evicted = []
        if self.layout.numbered and checkpoint.get('saver') is None:
            _logger.warning('%s records no checkpoint history: the numbered checkpoints already in %s stay, and '
                            'the ranking starts afresh', self.last, self.path)
        elif self.layout.numbered:
            saver = checkpoint['saver']
            before = [tuple(item) for item in saver['checkpoint_files'] if (self.path / item[0]).exists()]
            self.history, evicted = ranked(before, (self.layout.numbered.format(epoch=epoch), saver['pending'][1]),
                                           self.keep)
        self._complete_epoch(epoch, new_best, evicted)

    def _drop_rows_without_checkpoint(self):
        """A new run in a folder whose earlier start wrote no checkpoint: its rows belong to no checkpoint."""
        stale = [name for name in (*LOG_FILES, 'args.yaml') if (self.path / name).exists()]
        if stale:
            _logger.info('%s holds no checkpoint, only %s of a run that stopped before its first epoch ended: '
                         'starting again in it', self.path, ', '.join(stale))
        for name in LOG_FILES:
            with self.writing(self.path / name):
                (self.path / name).unlink(missing_ok=True)

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
            with self.writing(orphan):
                orphan.unlink(missing_ok=True)
        if orphans:
            _logger.info('removed %s, left by an interrupted write', ', '.join(p.name for p in orphans))

    def _write_settings(self, settings, resumed_at):
        """``args.yaml``: the settings of the run. A run continued in its own folder at epoch ``resumed_at``
        with other settings records what it changed under ``changes``, and warns where the environment
        differs, because the continued run then differs from an uninterrupted one in its last bits."""
        target = self.path / 'args.yaml'
        recorded = dict(settings)
        if resumed_at and target.exists():
            first = yaml.safe_load(target.read_text()) or {}
            differ = sorted(k for k in set(first) | set(settings) if k not in NOT_SETTINGS
                            and first.get(k) != settings.get(k))
            changed = {k: [first.get(k), settings.get(k)] for k in differ if k not in ENVIRONMENT}
            environment = [f'{k} {first.get(k)} -> {settings.get(k)}' for k in differ if k in ENVIRONMENT]
            if environment:
                _logger.warning('continuing the run of %s with %s: the resumed run is not bit-identical to an '
                                'uninterrupted one', self.path, ', '.join(environment))
            if changed:
                _logger.info('continuing at epoch %d with other settings than %s: %s', resumed_at, target,
                             ', '.join(f'{k} {old} -> {new}' for k, (old, new) in changed.items()))
            changes = first.get('changes', []) + ([dict(epoch=resumed_at, **changed)] if changed else [])
            recorded.update({'changes': changes} if changes else {})
        write_file(target, yaml.safe_dump(recorded, sort_keys=True).encode(), self._full_disk_advice())

    def _open_writer(self, log_dir, purge_step):
        """TensorBoard; a resumed run hides the events a crashed one wrote after its checkpoint (purge_step)."""
        from torch.utils.tensorboard import SummaryWriter  # slow to import; only the main process writes
        log_dir = Path(log_dir or self.path)
        with self.writing(log_dir):
            self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def _keep_rows_up_to(self, source, epoch, target):
        """Write to ``target`` the rows of ``source`` (summary.csv or log.txt) up to ``epoch``; rows after it
        belong to epochs whose checkpoint was never written, and a row cut short by a crash is dropped too."""
        head, rows = _log_rows(source)
        kept = [line for line, row_epoch in rows if row_epoch is not None and row_epoch <= epoch]
        if source == target and len(kept) == len(rows):
            return
        if len(kept) < len(rows):
            _logger.info('%s: left out %d rows after epoch %d', target, len(rows) - len(kept), epoch)
        write_file(target, ''.join(head + kept).encode('utf-8'), self._full_disk_advice())


def run_folder_path(cfg):
    """``--experiment`` under ``--output``; a resumed run's own folder, unless ``--output`` is the run folder
    (``run_name`` empty, as on ImageNet) and given; else ``run_name`` filled in with the options
    (``{model}_b{batch_size}``) and the start time (``{date}``)."""
    if cfg.experiment is not None:
        if cfg.experiment in ('', '.', '..') or '/' in cfg.experiment:
            raise RunFolderError(f'--experiment {cfg.experiment!r} must be the name of one folder: it names the run '
                                 f'folder inside --output ({cfg.output}); to write the run elsewhere, pass --output DIR')
        path = Path(cfg.output) / cfg.experiment
    elif cfg.resume and not cfg.eval and not (cfg.run_name == '' and cfg.source('output') == COMMAND_LINE):
        path = Path(cfg.resume).resolve().parent
    else:
        template = ('eval-' if cfg.eval and cfg.run_name else '') + cfg.run_name
        try:
            name = Path(template.format(**cfg.to_dict(), date=datetime.datetime.now().strftime('%Y%m%d-%H%M%S')))
        except (KeyError, IndexError, ValueError, AttributeError) as exc:
            raise RunFolderError(f'--run-name {cfg.run_name!r} cannot be filled in ({type(exc).__name__}: {exc}): it '
                                 'takes option names in braces, such as {model}, {batch_size} and {date}') from None
        if name.is_absolute() or '..' in name.parts:
            raise RunFolderError(f'--run-name {cfg.run_name!r} gives {name}, outside --output ({cfg.output}): a run '
                                 'name makes folders inside --output; to write the run elsewhere, pass --output DIR')
        path = Path(cfg.output) / name
    too_long = [part for part in path.parts if len(part.encode()) > NAME_MAX]
    if too_long:
        raise RunFolderError(f'the run folder name {too_long[0][:40]}... has {len(too_long[0].encode())} bytes, more '
                             f'than the {NAME_MAX} a file system allows: choose a shorter --experiment or --run-name')
    return path


def _remove_if_created(path, created):
    """Undo the folder a refused ``open`` made, where it is still empty."""
    if created:
        with contextlib.suppress(OSError):
            path.rmdir()


def _validated(layout, num_epochs, resume_from, checkpoint, checkpoint_hist):
    """The number of numbered checkpoints to keep, after checking the arguments."""
    if resume_from is None and checkpoint is not None:
        raise ValueError('checkpoint without resume_from: pass the path of the resumed file too')
    if not isinstance(num_epochs, int) or num_epochs < 1:
        raise ValueError(f'num_epochs must be a positive integer, got {num_epochs!r}')
    keep = layout.checkpoint_hist if checkpoint_hist is None else checkpoint_hist
    if layout.numbered and (not isinstance(keep, int) or keep < 1):
        raise RunFolderError(f'--checkpoint-hist {checkpoint_hist}: keep at least 1 numbered checkpoint')
    if checkpoint is not None:
        resume_state(checkpoint, layout, source=str(resume_from))
    return keep


def _resume_source(path, layout, resume_from, checkpoint):
    """The resolved folder of the resumed file (None for a new run), after refusing what would overwrite."""
    if path.exists() and not path.is_dir():
        raise RunFolderError(f'{path} is a file; the run folder must be a folder (or not exist yet)')
    check_unlocked(path)
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
    held = _checkpoints(path)
    if not held:
        return
    held = ', '.join(held[:4]) + (f' and {len(held) - 4} more' if len(held) > 4 else '')
    if resume_from is None:
        hint = (f'continue it with --resume {path / layout.last}, or ' if (path / layout.last).exists() else '')
        raise RunFolderError(f'{path} already holds a run ({held}), which a new run would overwrite: '
                             f'{hint}start the new run in another folder (--experiment NAME or --output DIR)')
    raise RunFolderError(
        f'cannot continue the run of {source} from {resume_from} in {path}: {path} already holds another run '
        f'({held}). Continue into a folder without checkpoints, or in {source} itself from its {layout.last}')


def _refuse_if_moved_on(path, resume_from, checkpoint):
    """Under the lock: refuse to continue from ``checkpoint`` where the run that held the folder went on past
    it after it was read (a newer latest checkpoint, or log rows of later epochs than a crash leaves)."""
    epoch = checkpoint['epoch']
    now = read_checkpoint(resume_from, mmap=True).get('epoch') if Path(resume_from).exists() else None
    later = max((row for name in LOG_FILES if (path / name).exists()
                 for _, row in _log_rows(path / name)[1] if row is not None), default=epoch)
    if now != epoch or later > epoch + 1:
        found = f'epoch {now}' if now is not None else 'no checkpoint'
        raise RunFolderError(
            f'{path} moved on while this run waited for it: {resume_from} held epoch {epoch} when this run read it '
            f'and now holds {found}, and the logs reach epoch {later}. Nothing was changed; run the command again '
            'to continue from what the folder holds now')


def _checkpoints(folder):
    """The checkpoint files in ``folder``: what a run there has to lose."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(('.pth', '.pth.tar')) and p.name != TIMM_TEMPORARY)


def _log_rows(path):
    """``(header lines, [(line, epoch or None)])`` of summary.csv or log.txt; a row cut short by a crash or
    without an epoch has None."""
    lines = path.read_text(encoding='utf-8').splitlines(keepends=True)
    head, column = [], None  # log.txt: JSON lines
    if path.name == 'summary.csv' and lines:
        header = next(csv.reader([lines[0]]))
        head, lines, column = lines[:1], lines[1:], header.index('epoch') if 'epoch' in header else 0
    rows = []
    for line in lines:
        epoch = None
        with contextlib.suppress(ValueError, KeyError, IndexError, TypeError, StopIteration):
            if line.endswith('\n'):
                epoch = int(json.loads(line)['epoch'] if column is None else next(csv.reader([line]))[column])
        rows.append((line, epoch))
    return head, rows


def _tensor_bytes(obj):
    """The bytes of the tensors in a nested container: what torch.save needs, give or take a little."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0
