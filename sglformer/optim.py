"""The ImageNet recipe's optimiser pieces: the learning rate from a base rate per 256 images,
layer-wise learning-rate decay parameter groups, and the per-iteration half-cycle cosine schedule.

Layers, from the input to the output: the tokenizer (``patch_embed``, or ``stem`` and ``tokenizer``
on CIFAR and DVS) is layer 0; then each module of ``localblock`` and of ``blocks``, in that order, is
one layer (on ImageNet: ``localblock.0`` is 1, ``blocks.i`` is i + 2); everything after the blocks (the
classifier, and the STB head on CIFAR and DVS) is the last layer L. A parameter of layer l learns at
``lr x layer_decay ** (L - l)``: with ``layer_decay`` 1.0 every group learns at ``lr``.
"""
import logging
import math

_logger = logging.getLogger(__name__)

EMBEDDING = ('patch_embed', 'stem', 'tokenizer')
STAGES = ('localblock', 'blocks')  # sequences of layers, in the order the forward pass runs them


def absolute_lr(blr, images_per_step):
    """The learning rate for ``images_per_step`` images per optimiser step (batch size x accumulation x
    processes) from ``blr``, the rate for 256."""
    return blr * images_per_step / 256


def layer_ids(model):
    """``(ids, last)``: the layer of every parameter name, and the id of the last layer."""
    offsets, last = {}, 1
    for stage in STAGES:
        modules = getattr(model, stage, None)
        if modules is not None:
            offsets[stage] = last
            last += len(modules)
    ids = {}
    for name, _ in model.named_parameters():
        top, _, rest = name.partition('.')
        if top in EMBEDDING:
            ids[name] = 0
        elif top in offsets:
            ids[name] = offsets[top] + int(rest.partition('.')[0])
        else:
            ids[name] = last
    return ids, last


def layer_decay_groups(model, weight_decay, layer_decay=1.0):
    """Optimiser parameter groups, one per (layer, with or without weight decay), each with its
    ``lr_scale``. Biases and other 1-D parameters (BatchNorm) get no weight decay; frozen parameters
    are left out."""
    ids, last = layer_ids(model)
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decays = param.ndim > 1 and not name.endswith('.bias')
        key = (ids[name], decays)
        if key not in groups:
            groups[key] = {'params': [], 'weight_decay': weight_decay if decays else 0.0,
                           'lr_scale': layer_decay ** (last - ids[name])}
        groups[key]['params'].append(param)
    _logger.debug('%d parameter groups over %d layers (layer decay %g)', len(groups), last + 1, layer_decay)
    # The full-rate groups first: the progress lines and logs show the first group's rate.
    return sorted(groups.values(), key=lambda group: -group['lr_scale'])


class HalfCosine:
    """Per-iteration learning rate: a linear warm-up from 0 to ``lr`` over ``warmup_epochs``, then half
    a cosine from ``lr`` down to ``min_lr`` at ``epochs``. Calling it with a fractional epoch
    (``epoch + step / steps``) sets every group of ``optimizer`` to that rate times its ``lr_scale``."""

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
            group['lr'] = lr * group.get('lr_scale', 1.0)
        return lr
