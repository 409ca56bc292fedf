"""The training and evaluation loops shared by every dataset folder.

``train_one_epoch`` handles AMP with a gradient scaler, gradient accumulation (with DDP's ``no_sync``
on the micro-batches that do not step), clipping, per-iteration learning-rate updates and a progress
display; ``evaluate`` returns loss, top-1 and top-5 summed exactly over all processes. Both take
batches already on the device and augmented (:class:`sglformer.data.Batches`).
"""
import contextlib
import logging
import math
import sys
import time

import torch
from torch import nn
from tqdm import tqdm

from .distributed import all_reduce_sum

_logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


def autocast(device, enabled):
    """fp16 autocast on CUDA (spikingjelly's CuPy kernels have no bfloat16); a no-op elsewhere."""
    if enabled and device.type == 'cuda':
        return torch.autocast(device_type='cuda', dtype=torch.float16)
    return contextlib.nullcontext()


def _progress(batches, description, enabled, total):
    # A live bar on a terminal; in logs and CI the periodic log lines carry the same numbers.
    return tqdm(batches, desc=description, total=total, leave=False, dynamic_ncols=True, file=sys.stderr,
                disable=not (enabled and sys.stderr.isatty()))


def _format_seconds(seconds):
    seconds = int(seconds)
    return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


def train_one_epoch(model, batches, steps, optimizer, loss_fn, device, epoch, num_epochs, *, scaler=None, amp=False,
                    accum_iter=1, clip_grad=None, lr_at=None, log_interval=50, is_main=True, world_size=1):
    """Train for one epoch over ``steps`` batches; returns ``{'loss', 'lr', 'img_per_s', 'grad_norm'}``
    of this process.

    ``lr_at(epoch_float)``, when given, sets the learning rate before every optimiser step
    (per-iteration schedules); otherwise the caller's epoch scheduler owns it.
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss_sum, seen, grad_norm = 0.0, 0, float('nan')
    start = time.perf_counter()
    bar = _progress(batches, f'epoch {epoch}', is_main, steps)
    for step, (images, targets) in enumerate(bar):
        if lr_at is not None and step % accum_iter == 0:
            lr_at(epoch + step / steps)
        updates = (step + 1) % accum_iter == 0 or step + 1 == steps
        sync = contextlib.nullcontext() if updates or not hasattr(model, 'no_sync') else model.no_sync()
        with sync:
            with autocast(device, amp):
                loss = loss_fn(model(images), targets)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise NonFiniteLossError(f'the training loss is {loss_value} at epoch {epoch}, step {step}')
            scaled = loss / accum_iter
            if scaler is not None:
                scaler.scale(scaled).backward()
            else:
                scaled.backward()
        if updates:
            grad_norm = _optimizer_step(model, optimizer, scaler, clip_grad)
        loss_sum += loss_value * images.shape[0]
        seen += images.shape[0]
        lr = optimizer.param_groups[0]['lr']
        elapsed = time.perf_counter() - start
        rate = seen * world_size / elapsed
        bar.set_postfix(loss=f'{loss_value:.4f}', lr=f'{lr:.2e}', img_s=f'{rate:.1f}', refresh=False)
        if is_main and ((step + 1) % log_interval == 0 or step + 1 == steps):
            left = elapsed / (step + 1) * (steps - step - 1)
            _logger.info('epoch %d/%d [%d/%d] loss %.4f lr %.3e %.1f img/s, epoch ends in %s', epoch, num_epochs - 1,
                         step + 1, steps, loss_sum / seen, lr, rate, _format_seconds(left))
    return {'loss': loss_sum / max(seen, 1), 'lr': optimizer.param_groups[0]['lr'],
            'img_per_s': seen * world_size / (time.perf_counter() - start), 'grad_norm': grad_norm}


def _optimizer_step(model, optimizer, scaler, clip_grad):
    parameters = [p for p in model.parameters() if p.grad is not None]
    if scaler is not None:
        scaler.unscale_(optimizer)
    norm = nn.utils.clip_grad_norm_(parameters, clip_grad if clip_grad else float('inf'))
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm.item()


@torch.no_grad()
def evaluate(model, batches, steps, device, amp=False, is_main=True):
    """Cross-entropy loss, top-1 and top-5 accuracy (percent) over the batches, summed over processes.
    ``amp``: under fp16 autocast (the CIFAR and ImageNet scripts evaluate so, the DVS ones in float32)."""
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction='sum')
    totals = [0.0, 0.0, 0.0, 0.0]  # loss, top-1 hits, top-5 hits, images
    for images, targets in _progress(batches, 'eval', is_main, steps):
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
