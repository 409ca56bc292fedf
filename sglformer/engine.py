"""The training and evaluation loops shared by every dataset folder.

:func:`train_one_epoch` handles float16 autocast with a gradient scaler (on CUDA, and on the CPU where asked
for: the same code with the device type as a parameter), gradient accumulation (with DDP's ``no_sync`` on
the micro-batches that do not step), clipping, per-iteration learning rates and a progress display;
:func:`evaluate` returns loss, top-1 and top-5 summed exactly over all processes. Both take
:class:`sglformer.data.Batches`: batches already on the device and augmented.
"""
import contextlib
import logging
import math
import random
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from timm.utils import dispatch_clip_grad
from tqdm import tqdm

from .distributed import DistInfo, all_reduce_sum

_logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class Trainer:
    """What training updates (the model and its DDP wrapper, optimiser, schedule, gradient scaler, the
    weights' moving average where kept), the loss it minimises, and the processes it runs on."""
    model: nn.Module
    ddp_model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: object  # sglformer.optim.Schedule
    scaler: torch.amp.GradScaler
    loss_fn: nn.Module
    dist: DistInfo = DistInfo()
    ema: nn.Module = None  # timm's ModelEmaV2


def autocast(device, enabled):
    """float16 autocast on ``device`` (spikingjelly's CuPy kernels have no bfloat16), or nothing."""
    return torch.autocast(device_type=device.type, dtype=torch.float16, enabled=enabled)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def epoch_seed(seed, epoch, rank):
    """Every random draw of an epoch follows from (seed, epoch, rank), so a resumed run repeats the
    augmentation, mixup and shuffling of an uninterrupted one without saving RNG states."""
    return seed * 1_000_003 + epoch * 1009 + rank


def _progress(batches, description, enabled, total):
    # A live bar on a terminal; in logs and CI the periodic log lines carry the same numbers.
    return tqdm(batches, desc=description, total=total, leave=False, dynamic_ncols=True, file=sys.stderr,
                disable=not (enabled and sys.stderr.isatty()))


def _format_seconds(seconds):
    seconds = int(seconds)
    return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


def train_one_epoch(trainer, batches, epoch, cfg):
    """Train for one epoch of ``batches`` with the options of ``cfg`` (``amp``, ``accum_iter``, ``clip_grad``,
    ``clip_mode``, ``log_interval``, ``seed``); returns ``{'loss', 'lr', 'img_per_s', 'grad_norm'}`` of this
    process, the gradient norm (after unscaling, before clipping) of the epoch's last optimiser step."""
    model, optimizer, dist = trainer.ddp_model, trainer.optimizer, trainer.dist
    seed = epoch_seed(cfg.seed, epoch, dist.rank)
    seed_everything(seed)
    model.train()
    optimizer.zero_grad(set_to_none=True)
    steps, num_epochs = len(batches), trainer.schedule.num_epochs
    loss_sum, seen, grad_norm = 0.0, 0, float('nan')
    start = time.perf_counter()
    bar = _progress(batches.epoch(epoch, seed), f'epoch {epoch}', dist.is_main, steps)
    for step, (images, targets) in enumerate(bar):
        if trainer.schedule.lr_at is not None and step % cfg.accum_iter == 0:
            trainer.schedule.lr_at(epoch + step / steps)
        updates = (step + 1) % cfg.accum_iter == 0 or step + 1 == steps
        sync = contextlib.nullcontext() if updates or not hasattr(model, 'no_sync') else model.no_sync()
        with sync:
            with autocast(images.device, cfg.amp):
                loss = trainer.loss_fn(model(images), targets)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise NonFiniteLossError(f'the training loss is {loss_value} at epoch {epoch}, step {step}')
            trainer.scaler.scale(loss / cfg.accum_iter).backward()
        if updates:
            norm = _optimizer_step(trainer, cfg, measure=step + 1 == steps)
            grad_norm = grad_norm if norm is None else norm
        loss_sum += loss_value * images.shape[0]
        seen += images.shape[0]
        lr = optimizer.param_groups[0]['lr']
        elapsed = time.perf_counter() - start
        rate = seen * dist.world_size / elapsed
        bar.set_postfix(loss=f'{loss_value:.4f}', lr=f'{lr:.2e}', img_s=f'{rate:.1f}', refresh=False)
        if dist.is_main and ((step + 1) % cfg.log_interval == 0 or step + 1 == steps):
            left = elapsed / (step + 1) * (steps - step - 1)
            _logger.info('epoch %d/%d [%d/%d] loss %.4f lr %.3e %.1f img/s, epoch ends in %s', epoch, num_epochs - 1,
                         step + 1, steps, loss_sum / seen, lr, rate, _format_seconds(left))
    return {'loss': loss_sum / max(seen, 1), 'lr': optimizer.param_groups[0]['lr'],
            'img_per_s': seen * dist.world_size / (time.perf_counter() - start), 'grad_norm': grad_norm}


def _optimizer_step(trainer, cfg, measure):
    """Unscale, clip (timm's modes), step, update the moving average and clear; returns the gradient norm
    before clipping where clipping by norm or ``measure`` needs it (a device synchronisation on CUDA), else None."""
    optimizer, scaler = trainer.optimizer, trainer.scaler
    scaler.unscale_(optimizer)
    norm = None
    by_norm = cfg.clip_grad and cfg.clip_mode == 'norm'
    if by_norm or measure:
        parameters = [p for p in trainer.model.parameters() if p.grad is not None]
        norm = nn.utils.clip_grad_norm_(parameters, cfg.clip_grad if by_norm else float('inf')).item()
    if cfg.clip_grad and not by_norm:
        parameters = list(trainer.model.parameters())
        dispatch_clip_grad(parameters[:-2] if cfg.clip_mode == 'agc' else parameters, cfg.clip_grad, cfg.clip_mode)
    scaler.step(optimizer)
    scaler.update()
    if trainer.ema is not None:
        trainer.ema.update(trainer.model)
    optimizer.zero_grad(set_to_none=True)
    return norm


@torch.no_grad()
def evaluate(model, batches, device, amp=False, is_main=True):
    """Cross-entropy loss, top-1 and top-5 accuracy (percent) over the batches, summed over processes.
    ``amp``: under float16 autocast (the CIFAR and ImageNet scripts evaluate so, the DVS ones in float32)."""
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction='sum')
    totals = [0.0, 0.0, 0.0, 0.0]  # loss, top-1 hits, top-5 hits, images
    for images, targets in _progress(batches.epoch(), 'eval', is_main, len(batches)):
        with autocast(device, amp):
            logits = model(images)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top.eq(targets[:, None])
        totals[0] += loss_fn(logits.float(), targets).item()
        totals[1] += hits[:, :1].sum().item()
        totals[2] += hits.sum().item()
        totals[3] += images.shape[0]
    loss, top1, top5, count = all_reduce_sum(totals, device)
    count = max(count, 1)
    return {'loss': loss / count, 'top1': 100.0 * top1 / count, 'top5': 100.0 * top5 / count, 'images': int(count)}
