"""Reading checkpoints safely and writing them atomically.

Files are read with ``torch.load(weights_only=True)``: tensors, plain containers and
``argparse.Namespace`` (the ``args`` of timm's CheckpointSaver and of the authors' scripts) are
accepted; any other Python object is refused before it is built, so a file cannot run code.
"""
import argparse
import os
import pickle
import re
import tempfile
from pathlib import Path

import torch

# Containers the authors' scripts and timm write, in the order they are looked for.
STATE_DICT_KEYS = ('state_dict', 'model', 'module')
EMA_KEY = 'state_dict_ema'
WRAPPER_PREFIXES = ('module.', '_orig_mod.')  # DistributedDataParallel, torch.compile


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, unsafe, or does not fit the model."""


def read_checkpoint(path, map_location='cpu'):
    """Load a checkpoint file without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'checkpoint {path} does not exist' if not path.exists()
                              else f'checkpoint {path} is not a file')
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True)
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
    """Load weights into ``model``; returns the checkpoint keys left out.

    ``drop_mismatched_head`` leaves out the classifier weights when their shape differs from the
    model's (fine-tuning on another class count); the model keeps its freshly initialised head.
    """
    own = model.state_dict()
    dropped = []
    if drop_mismatched_head:
        head_name = _classifier_name(model)
        dropped = [k for k, v in state_dict.items()
                   if k.startswith(head_name + '.') and k in own and own[k].shape != v.shape]
        state_dict = {k: v for k, v in state_dict.items() if k not in dropped}
    mismatched = [f'{k}: checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)}'
                  for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state_dict and k not in dropped]
    unexpected = [k for k in state_dict if k not in own]
    if mismatched or (strict and (missing or unexpected)):
        problems = [f'{len(keys)} {what}: {_summary(keys)}'
                    for what, keys in (('with another shape', mismatched), ('missing', missing),
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


def load_checkpoint(model, path, strict=True, use_ema=False, drop_mismatched_head=False):
    """Load a file's weights into ``model`` and return the whole checkpoint as read.

    Accepts a raw state dict, timm's CheckpointSaver files (``state_dict``; ``state_dict_ema`` with
    ``use_ema``), the authors' ImageNet and DVS files (``model``), with or without ``module.`` prefixes.
    """
    checkpoint = read_checkpoint(path)
    state_dict = extract_state_dict(checkpoint, use_ema=use_ema, source=str(path))
    load_state_dict(model, state_dict, strict=strict, drop_mismatched_head=drop_mismatched_head, source=str(path))
    return checkpoint


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


def sync_folder(folder):
    """Flush a folder's entries (renames, new links) to the disk, so that they survive a power cut."""
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def save_checkpoint(obj, path):
    """``torch.save`` through :func:`write_atomically`: any previous file at ``path`` stays intact until the
    new one is complete."""
    write_atomically(path, lambda f: torch.save(obj, f))
