"""Every checkpoint format this project reads or writes, in one place: reading safely, loading weights
into a model, writing atomically, and the training containers of the authors' three scripts (``timm``,
``dvs``, ``mae``) with their file names, retention rules and what a resumed run continues from.

Files are read with ``torch.load(weights_only=True)``: tensors, plain containers and
``argparse.Namespace`` (the ``args`` of timm's CheckpointSaver and of the authors' scripts) are
accepted; any other Python object is refused before it is built, so a file cannot run code.
"""
import argparse
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from timm.utils import unwrap_model
from torch import nn

from .files import write_atomically

# Containers the authors' scripts and timm write, in the order they are looked for.
STATE_DICT_KEYS = ('state_dict', 'model', 'module')
EMA_KEY = 'state_dict_ema'
WRAPPER_PREFIXES = ('module.', '_orig_mod.')  # DistributedDataParallel, torch.compile


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, unsafe, or does not fit the model."""


def read_checkpoint(path, map_location='cpu', mmap: bool = False) -> dict:
    """Load a checkpoint file without unpickling arbitrary objects; with ``mmap`` its tensors are mapped from
    the file, not read (cheap where only the plain values are wanted)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'checkpoint {path} does not exist' if not path.exists()
                              else f'checkpoint {path} is not a file')
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        if 'Weights only load failed' in str(exc):
            found = re.search(r'GLOBAL ([\w.]+)', str(exc))
            what = f'the Python object {found.group(1)}' if found else 'a Python object'
            raise CheckpointError(
                f'refused to load {path}: it contains {what}, which could run code when unpickled; only '
                'tensors, plain containers and argparse.Namespace are accepted') from None
        raise CheckpointError(f'{path} is not a PyTorch checkpoint: {_first_line(exc)}') from None
    except Exception as exc:  # truncated zip, wrong magic number, ...
        raise CheckpointError(f'{path} is not a readable PyTorch checkpoint (truncated or corrupt?): '
                              f'{_first_line(exc)}') from None


def _first_line(exc):
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def extract_state_dict(checkpoint, use_ema=False, source='checkpoint'):
    """The model weights inside any of the known containers, with wrapper prefixes removed."""
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f'{source} holds a {type(checkpoint).__name__}, not a state dict or a checkpoint dict')
    if use_ema:
        if EMA_KEY not in checkpoint:
            raise CheckpointError(f"{source} has no '{EMA_KEY}' (keys: {', '.join(map(str, checkpoint))})")
        state_dict = checkpoint[EMA_KEY]
    else:
        state_dict = next((checkpoint[k] for k in STATE_DICT_KEYS if isinstance(checkpoint.get(k), dict)), checkpoint)
    if not state_dict or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{source} holds no model weights (keys: {', '.join(map(str, checkpoint))[:200]})")
    return {_strip_prefixes(k): v for k, v in state_dict.items()}


def _strip_prefixes(key):
    for prefix in WRAPPER_PREFIXES:
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def load_state_dict(model, state_dict, strict=True, drop_mismatched_head=False, source='checkpoint'):
    """Load weights into ``model``; returns the checkpoint keys left out. Weights that are not finite (NaN or
    infinite, as a diverged run leaves them) are refused: a model would compute with them, or, where a
    neuron turns NaN into silence, seem to work.

    ``drop_mismatched_head`` leaves out the classifier weights when their shape differs from the
    model's (fine-tuning on another class count); the model keeps its freshly initialised head.
    """
    broken = [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise CheckpointError(f'{source} holds weights that are not finite (NaN or infinity) in {_summary(broken, 3)}: '
                              'it comes from a run that diverged; use an earlier checkpoint of that run')
    own = model.state_dict()
    dropped = []
    if drop_mismatched_head:
        head_name = _classifier_name(model)
        dropped = [k for k, v in state_dict.items()
                   if k.startswith(head_name + '.') and k in own and own[k].shape != v.shape]
        state_dict = {k: v for k, v in state_dict.items() if k not in dropped}
    mismatched = [k for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state_dict and k not in dropped]
    unexpected = [k for k in state_dict if k not in own]
    if mismatched or (strict and (missing or unexpected)):
        steps = 'full_size_conv.weight'  # the STB head's kernel spans the T time steps
        if mismatched == [steps] and not (missing or unexpected):
            raise CheckpointError(f'{source} was trained with T={state_dict[steps].shape[-1]} time steps and this model '
                                  f'has T={own[steps].shape[-1]} (its STB head spans exactly T steps): pass '
                                  f'-T {state_dict[steps].shape[-1]}')
        shapes = [f'{k}: checkpoint {tuple(state_dict[k].shape)}, model {tuple(own[k].shape)}' for k in mismatched]
        problems = [f'{len(keys)} {what}: {_summary(keys)}'
                    for what, keys in (('with another shape', shapes), ('missing', missing),
                                       ('unexpected', unexpected)) if keys]
        hint = ('; is it a checkpoint of another variant or size? Build the model with the same '
                'arguments it was trained with')
        head_prefix = _classifier_name(model) + '.'
        if mismatched and all(k.startswith(head_prefix) for k in mismatched) and not (missing or unexpected):
            hint += ', or drop the classifier head to fine-tune on another class count'
        raise CheckpointError(f'{source} does not fit {type(model).__name__}:\n  ' + '\n  '.join(problems) + hint)
    model.load_state_dict(state_dict, strict=False)
    return dropped


def _classifier_name(model):
    head = model.get_classifier() if hasattr(model, 'get_classifier') else None
    for name, module in model.named_modules():
        if module is head:
            return name
    return 'head'


def _summary(keys, shown=4):
    more = f' (+{len(keys) - shown} more)' if len(keys) > shown else ''
    return ', '.join(keys[:shown]) + more


def load_checkpoint(model: nn.Module, path, strict: bool = True, use_ema: bool = False,
                    drop_mismatched_head: bool = False) -> dict:
    """Load a file's weights into ``model`` and return the whole checkpoint as read.

    Accepts a raw state dict, timm's CheckpointSaver files (``state_dict``; ``state_dict_ema`` with
    ``use_ema``), the authors' ImageNet and DVS files (``model``), with or without ``module.`` prefixes.
    """
    checkpoint = read_checkpoint(path)
    state_dict = extract_state_dict(checkpoint, use_ema=use_ema, source=str(path))
    load_state_dict(model, state_dict, strict=strict, drop_mismatched_head=drop_mismatched_head, source=str(path))
    return checkpoint


def save_checkpoint(obj, path):
    """``torch.save`` through :func:`write_atomically`: any previous file at ``path`` stays intact until the
    new one is complete."""
    write_atomically(path, lambda f: torch.save(obj, f))


@dataclass(frozen=True)
class CheckpointLayout:
    """The container and file names of one of the authors' training scripts, and which files it keeps."""
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

    def container(self, epoch, top1, best, model, optimizer, scheduler, scaler, args, saver=None, ema=None):
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
        if ema is not None:
            state[EMA_KEY] = unwrap_model(ema).state_dict()
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


def checkpoint_layout(layout):
    """A :class:`CheckpointLayout`, given as itself or by its name in ``LAYOUTS``."""
    if isinstance(layout, CheckpointLayout):
        return layout
    if layout not in LAYOUTS:
        raise CheckpointError(f"unknown checkpoint format {layout!r}; one of {', '.join(LAYOUTS)}")
    return LAYOUTS[layout]


def resume_state(checkpoint, layout, source='the checkpoint'):
    """What a run continues from: ``epoch`` (the checkpoint's), ``start_epoch``, ``best``
    (``{'top1', 'top5', 'epoch'}`` or None) and the ``optimizer``, ``scheduler``, ``scaler`` and weight
    average (``ema``) states (None where the checkpoint has none)."""
    layout = checkpoint_layout(layout)
    missing = [key for key in ('epoch', 'optimizer', layout.weights_key) if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{source} has no {', '.join(map(repr, missing))}, so it is not a training checkpoint "
                              f"of the {layout.name} format; to start from its weights, pass it as "
                              '--initial-checkpoint instead of --resume')
    best = layout.recorded_best(checkpoint) or layout.initial_best
    return {'epoch': checkpoint['epoch'], 'start_epoch': checkpoint['epoch'] + 1, 'best': best,
            'optimizer': checkpoint['optimizer'], 'scheduler': checkpoint.get('lr_scheduler') or None,
            'scaler': checkpoint.get(layout.scaler_key), 'ema': checkpoint.get(EMA_KEY)}


def ranked(history, entry, keep):
    """timm's CheckpointSaver rule: the kept ``(name, top-1)`` files best first and those displaced.
    A full history takes ``entry`` only when it beats the worst; ties keep the earlier (stable sort)."""
    if len(history) >= keep and not entry[1] > history[-1][1]:
        return history, []
    kept, evicted = (history, []) if len(history) < keep else (history[:keep - 1], history[keep - 1:])
    return sorted([*kept, entry], key=lambda item: item[1], reverse=True), evicted


def optimizer_state(optimizer, model, state, source='the checkpoint'):
    """The optimiser state ``state`` of a checkpoint of ``model`` in the form ``optimizer`` loads: as it is when
    its parameter groups are the optimiser's, or mapped parameter by parameter from the grouping of the
    authors' ImageNet script (their checkpoint-N.pth files)."""
    sizes = [len(group['params']) for group in optimizer.param_groups]
    saved = [len(group['params']) for group in state['param_groups']]
    if saved == sizes:
        return state
    names = {id(p): name for name, p in model.named_parameters()}
    ours = {names[id(p)]: index for index, p in enumerate(p for group in optimizer.param_groups for p in group['params'])}
    theirs = _authors_imagenet_order(model)
    if saved != [len(group) for group in theirs]:
        raise CheckpointError(f'{source}: its optimiser state has parameter groups of {saved} parameters, and this '
                              f'run groups them as {sizes}: is it a checkpoint of another model? Pass --no-resume-opt '
                              'to continue from its weights with a new optimiser state')
    order = [name for group in theirs for name in group]
    mapped = {ours[name]: state['state'][index] for index, name in enumerate(order)
              if index in state['state'] and name in ours}
    return dict(optimizer.state_dict(), state=dict(sorted(mapped.items())))


def _authors_imagenet_order(model):
    """The parameter names of ``model`` in the groups of the authors' ImageNet optimiser. Their layer-decay
    rule puts every parameter of these models in one layer, so there are two groups, made in the order of
    first appearance: with weight decay (more than one dimension) and without; the unused LayerNorms are in
    (never updated, so without state)."""
    groups = {}
    for name, parameter in model.named_parameters():
        groups.setdefault(parameter.ndim > 1, []).append(name)
    return list(groups.values())
