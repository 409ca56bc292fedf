"""What the commands (training, evaluation, energy, bench, params, demo) share: the model a configuration
names, its weights, the device it runs on, inputs of its shape, and the errors they all end in one line."""
import logging

import timm
import torch
from timm.layers import trunc_normal_

from .checkpoint import CheckpointError, extract_state_dict, load_state_dict, read_checkpoint
from .config import Config, ConfigError
from .data import DatasetError
from .distributed import DistributedError, default_device
from .engine import NonFiniteLossError
from .files import FolderInUseError, WriteError
from .neuron import NeuronBackendError
from .run_folder import RunFolderError
from .variants import load_variants

_logger = logging.getLogger(__name__)

# What a command reports as one line (exit status 2) rather than a traceback.
EXPECTED_ERRORS = (ConfigError, DatasetError, CheckpointError, NeuronBackendError, RunFolderError, FolderInUseError,
                   WriteError, DistributedError, NonFiniteLossError)

# Options (sglformer.config) that map onto model constructor keywords (the authors' names).
MODEL_OPTIONS = {'time_step': 'T', 'layer': 'depths', 'dim': 'embed_dims', 'num_heads': 'num_heads',
                 'mlp_ratio': 'mlp_ratios', 'num_classes': 'num_classes', 'patch_size': 'patch_size',
                 'neuron': 'neuron', 'neuron_backend': 'neuron_backend', 'recompute': 'recompute'}


def create_model(cfg):
    """The registered model ``cfg.model`` with the size and neuron options that are set (None keeps the
    variant's). ``neuron='auto'`` is settled by the model's first forward (or, once, by the caller through
    :func:`sglformer.neuron.choose_neuron`)."""
    load_variants()
    kwargs = {kw: getattr(cfg, opt) for opt, kw in MODEL_OPTIONS.items() if getattr(cfg, opt, None) is not None}
    if getattr(cfg, 'img_size', None) is not None:
        kwargs.update(img_size_h=cfg.img_size, img_size_w=cfg.img_size)
    if getattr(cfg, 'per_image_neurons', False):  # an ImageNet option: the other models' neurons run per image
        kwargs.update(per_image_neurons=True)
    if not timm.is_model(cfg.model):
        raise ConfigError(f"unknown model {cfg.model!r}; registered: {', '.join(load_variants())}")
    return timm.create_model(cfg.model, **kwargs)


def build_model(cfg):
    """The model on ``cfg.device``, after a forward pass of one input of its shape on the 'meta' device (no
    memory, no time) has shown that the size options fit together."""
    try:
        with torch.device('meta'):
            probe = create_model(cfg.replace(neuron='fused', neuron_backend='auto')).eval()
            probe.forward_head(probe.forward_features(torch.empty(probe.input_shape(1))))  # no neuron choice on meta
    except ConfigError:
        raise
    except (ValueError, RuntimeError) as exc:
        sizes = ', '.join(f'{name}={getattr(cfg, name)}' for name in
                          ('dim', 'num_heads', 'layer', 'time_step', 'mlp_ratio', 'img_size', 'num_classes')
                          if getattr(cfg, name, None) is not None)
        raise ConfigError(f'{cfg.model} cannot be built with these options ({sizes or "its defaults"}): {exc}') from None
    return create_model(cfg).to(cfg.device)


def model_family(name):
    """``'cifar'``, ``'events'`` or ``'imagenet'``: the data the registered model ``name`` takes."""
    with torch.device('meta'):
        return create_model(Config({'model': name})).family


def resolve_device(requested, dist=None):
    """The device of this process: ``requested`` (default: CUDA where available), on a multi-GPU run
    (``dist``) the process's own GPU. A device this machine lacks is a :class:`ConfigError`."""
    try:
        device = torch.device(requested or default_device())
    except RuntimeError:
        raise ConfigError(f'--device {requested!r} is not a device name: use cpu, cuda or cuda:N') from None
    if device.type not in ('cpu', 'cuda'):
        raise ConfigError(f'--device {requested}: SGLFormer runs on cpu or cuda devices')
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise ConfigError(f'--device {requested}: CUDA is not available on this machine; use --device cpu')
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f'--device {requested}: this machine has {torch.cuda.device_count()} CUDA devices, '
                              f'cuda:0 to cuda:{torch.cuda.device_count() - 1}')
        if dist is not None and dist.enabled:
            device = torch.device('cuda', dist.local_rank)
    return device


def load_weights(model, path, checkpoint=None, fine_tune=False):
    """Load the weights of ``path`` (or of ``checkpoint``, already read from it) into ``model``; returns the
    checkpoint. ``fine_tune`` starts a new run from them: a classifier of another shape is left out, and on
    ImageNet the authors' ``--finetune`` rule applies: keys that do not fit are left out with a warning, and
    the classifier's weight is drawn afresh (normal, std 2e-5) whether or not it was loaded."""
    checkpoint = read_checkpoint(path) if checkpoint is None else checkpoint
    state_dict = extract_state_dict(checkpoint, source=path)
    authors = fine_tune and model.family == 'imagenet'
    dropped = load_state_dict(model, state_dict, strict=not authors, drop_mismatched_head=fine_tune, source=path)
    if dropped:
        _logger.warning('%s: classifier weights of another shape left out (%s); the classifier starts from random '
                        'weights', path, ', '.join(dropped))
    if authors:
        own = model.state_dict()
        missing, unexpected = [k for k in own if k not in state_dict], [k for k in state_dict if k not in own]
        if missing or unexpected:
            _logger.warning('%s: %d weights of the model not in the file (%s), %d of the file not in the model (%s)',
                            path, len(missing), ', '.join(missing[:3]), len(unexpected), ', '.join(unexpected[:3]))
        trunc_normal_(model.get_classifier().weight, std=2e-5)
    return checkpoint


def synthetic_batches(model, batches, batch_size, seed=0, event_density=0.1):
    """Random inputs of ``model``'s shape: normal images, or binary event frames with ``event_density`` ones."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(batches):
        shape = model.input_shape(batch_size)
        if model.family == 'events':
            yield (torch.rand(shape, generator=generator) < event_density).float()
        else:
            yield torch.randn(shape, generator=generator)
