"""What a training run writes: checkpoints in the authors' containers, ``summary.csv``, ``log.txt``,
``args.yaml`` and TensorBoard events. Only the main process writes.

Three checkpoint layouts reproduce the authors' three scripts, so that their tools and ours read
each other's files:

- ``timm`` (CIFAR): timm's CheckpointSaver: ``last.pth.tar`` every epoch, ``model_best.pth.tar``, the last
  N ``checkpoint-{epoch}.pth.tar``; keys ``epoch, arch, state_dict, optimizer, version, args, metric, amp_scaler``.
- ``dvs`` (CIFAR10-DVS, DVS128 Gesture): ``checkpoint_max_test_acc1.pth`` on a new best and
  ``checkpoint_latest.pth`` every epoch; keys ``model, optimizer, lr_scheduler, epoch, args, max_test_acc1,
  test_acc5_at_max_test_acc1``.
- ``mae`` (ImageNet): ``checkpoint-{epoch}.pth`` when accuracy improves within the last 20 epochs (as the
  authors keep) and ``checkpoint-last.pth`` every epoch; keys ``model, optimizer, epoch, scaler, args``
  (plus ``max_accuracy``). Its ``log.txt`` uses the authors' names (``train_loss, train_lr, test_loss,
  test_acc1, test_acc5, epoch, n_parameters``, ...).
"""
import csv
import datetime
import json
import os
import shutil
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path

import yaml

from .checkpoint import save_checkpoint

SUMMARY_FIELDS = ('epoch', 'train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'lr', 'img_per_s')


@dataclass(frozen=True)
class CheckpointLayout:
    name: str
    last: str  # written after every epoch; what --resume reads
    best: str  # may contain {epoch}
    numbered: str = None  # one per epoch, the last `checkpoint_hist` kept
    best_window: int = None  # only epochs this close to the end may write `best`
    scaler_key: str = 'scaler'
    best_key: str = 'max_accuracy'
    log_names: tuple = ()  # (ours, the authors') key pairs renamed in log.txt

    def container(self, model, optimizer, scheduler, scaler, epoch, args, best):
        """The checkpoint dict of this layout; ``best`` holds the best ``top1``/``top5`` so far."""
        args = Namespace(**vars(args))
        if self.name == 'timm':
            state = {'epoch': epoch, 'arch': args.model, 'state_dict': model.state_dict(),
                     'optimizer': optimizer.state_dict(), 'version': 2, 'args': args, 'metric': best['top1']}
        elif self.name == 'dvs':
            state = {'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
                     'lr_scheduler': scheduler.state_dict() if scheduler is not None else {}, 'epoch': epoch,
                     'args': args, 'max_test_acc1': best['top1'], 'test_acc5_at_max_test_acc1': best['top5']}
        else:
            state = {'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'epoch': epoch, 'args': args,
                     'max_accuracy': best['top1']}
        if scaler is not None:
            state[self.scaler_key] = scaler.state_dict()
        return state

    def best_so_far(self, checkpoint):
        """``{'top1', 'top5'}`` recorded in a checkpoint of this layout (None where it records none)."""
        top1 = checkpoint.get(self.best_key)
        return None if top1 is None else {'top1': top1, 'top5': checkpoint.get('test_acc5_at_max_test_acc1')}


LAYOUTS = {
    'timm': CheckpointLayout('timm', 'last.pth.tar', 'model_best.pth.tar', numbered='checkpoint-{epoch}.pth.tar',
                             scaler_key='amp_scaler', best_key='metric'),
    'dvs': CheckpointLayout('dvs', 'checkpoint_latest.pth', 'checkpoint_max_test_acc1.pth', best_key='max_test_acc1'),
    'mae': CheckpointLayout('mae', 'checkpoint-last.pth', 'checkpoint-{epoch}.pth', best_window=20, log_names=(
        ('lr', 'train_lr'), ('img_per_s', 'train_img_per_s'), ('grad_norm', 'train_grad_norm'),
        ('eval_loss', 'test_loss'), ('eval_top1', 'test_acc1'), ('eval_top5', 'test_acc5'))),
}


def folder_name(args, template):
    """A run folder's name from the run's settings, e.g. ``{model}_b{batch_size}_T{time_step}_lr{lr}``;
    ``{date}`` is the start time."""
    fields = dict(vars(args), date=datetime.datetime.now().strftime('%Y%m%d-%H%M%S'))
    return template.format(**fields)


class RunFolder:
    def __init__(self, path, layout, keep=3, writer=None):
        self.path = Path(path)
        self.layout = layout
        self.keep = keep
        self.writer = writer

    @classmethod
    def create(cls, path, layout, args):
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / 'args.yaml').write_text(yaml.safe_dump(vars(args), sort_keys=True))
        from torch.utils.tensorboard import SummaryWriter  # slow to import; only the main process writes
        return cls(path, layout, args.checkpoint_hist, SummaryWriter(log_dir=str(args.log_dir or path)))

    @property
    def last(self):
        return self.path / self.layout.last

    def save(self, state, epoch, is_best, num_epochs):
        save_checkpoint(state, self.last)
        layout = self.layout
        if layout.numbered:
            _link_atomically(self.last, self.path / layout.numbered.format(epoch=epoch))
            for old in range(epoch - self.keep, -1, -1):
                stale = self.path / layout.numbered.format(epoch=old)
                if not stale.exists():
                    break
                stale.unlink()
        if is_best and (layout.best_window is None or epoch > num_epochs - layout.best_window):
            _link_atomically(self.last, self.path / layout.best.format(epoch=epoch))

    def log_epoch(self, row, extra=None):
        """One row of ``summary.csv``, one JSON line of ``log.txt`` and the TensorBoard scalars."""
        summary = self.path / 'summary.csv'
        new = not summary.exists()
        with open(summary, 'a', newline='') as f:
            out = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS)
            if new:
                out.writeheader()
            out.writerow({k: (f'{v:.6g}' if isinstance(v, float) else v) for k, v in row.items()})
        names = dict(self.layout.log_names)
        with open(self.path / 'log.txt', 'a') as f:
            f.write(json.dumps({names.get(k, k): v for k, v in dict(row, **(extra or {})).items()}) + '\n')
        for key, value in row.items():
            if key != 'epoch':
                self.writer.add_scalar(key, value, row['epoch'])
        self.writer.flush()

    def close(self):
        self.writer.close()


def _link_atomically(source, target):
    """``target`` becomes a copy of ``source`` (a hard link where possible) without a moment in which
    it is missing or half written."""
    tmp = target.with_name(f'.{target.name}.tmp')
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:  # file systems without hard links
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)
