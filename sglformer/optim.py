"""The optimiser and the learning-rate schedule of a training run (docs/training.md).

The optimiser is timm's ``create_optimizer_v2`` over timm's parameter groups (no weight decay for
biases and other 1-D parameters, frozen parameters left out). That is also what the authors' ImageNet
layer-decay groups amount to on these models: their rule puts every parameter in the last layer, so
every group learns at the full rate whatever ``layer_decay`` is.
"""
import difflib
import math

from timm.optim import create_optimizer_v2, list_optimizers
from timm.scheduler import create_scheduler_v2

from .config import ConfigError


def absolute_lr(blr, images_per_step):
    """The learning rate for ``images_per_step`` images per optimiser step (batch size x accumulation x
    processes) from ``blr``, the rate for 256."""
    return blr * images_per_step / 256


def build_optimizer(cfg, model):
    extra = {key: value for key, value in (('eps', cfg.opt_eps), ('betas', cfg.opt_betas and tuple(cfg.opt_betas)))
             if value}
    if cfg.opt.lower().split('_')[-1] not in list_optimizers():
        close = difflib.get_close_matches(cfg.opt.lower(), list_optimizers(), n=3)
        raise ConfigError(f"'opt' {cfg.opt!r} is not an optimiser of timm" +
                          (f"; did you mean {' or '.join(close)}?" if close else '; for example adamw, sgd, lamb'))
    return create_optimizer_v2(model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                               **extra)


class HalfCosine:
    """Per-iteration learning rate: a linear warm-up from 0 to ``lr`` over ``warmup_epochs``, then half
    a cosine from ``lr`` down to ``min_lr`` at ``epochs``. Calling it with a fractional epoch
    (``epoch + step / steps``) sets every group of ``optimizer`` to that rate.

    Ours rather than timm's cosine scheduler, which counts whole updates: the authors' schedule is a
    function of the fractional epoch, and timm's rates differ from it in the last bits."""

    def __init__(self, optimizer, lr, min_lr, warmup_epochs, epochs):
        self.optimizer = optimizer
        self.lr, self.min_lr = lr, min_lr
        self.warmup_epochs, self.epochs = warmup_epochs, epochs

    def value(self, epoch):
        if epoch < self.warmup_epochs:
            return self.lr * epoch / self.warmup_epochs
        progress = (epoch - self.warmup_epochs) / (self.epochs - self.warmup_epochs)
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def __call__(self, epoch):
        lr = self.value(epoch)
        for group in self.optimizer.param_groups:
            group['lr'] = lr
        return lr


class Schedule:
    """The learning rate over the run: :meth:`start_epoch` before each epoch, and ``lr_at(epoch_float)``
    before each optimiser step where the schedule is per iteration (None otherwise)."""

    def __init__(self, cfg, optimizer):
        self.scheduler, self.lr_at = None, None
        if cfg.sched == 'halfcos':
            self.num_epochs = cfg.epochs
            self.lr_at = HalfCosine(optimizer, cfg.lr, cfg.min_lr, cfg.warmup_epochs, cfg.epochs)
        else:
            noise = cfg.lr_noise and (cfg.lr_noise[0] if len(cfg.lr_noise) == 1 else list(cfg.lr_noise))
            self.scheduler, self.num_epochs = create_scheduler_v2(
                optimizer, sched=cfg.sched, num_epochs=cfg.epochs, cooldown_epochs=cfg.cooldown_epochs,
                min_lr=cfg.min_lr, warmup_lr=cfg.warmup_lr, warmup_epochs=cfg.warmup_epochs,
                decay_epochs=cfg.decay_epochs, decay_rate=cfg.decay_rate, noise=noise, noise_pct=cfg.lr_noise_pct,
                noise_std=cfg.lr_noise_std, noise_seed=cfg.seed, cycle_mul=cfg.lr_cycle_mul,
                cycle_limit=cfg.lr_cycle_limit)

    def start_epoch(self, epoch):
        if self.lr_at is not None:
            self.lr_at(epoch)
        else:
            self.scheduler.step(epoch)
