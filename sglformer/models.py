"""The SGLFormer networks (CIFAR/DVS and ImageNet), built from :mod:`sglformer.layers`.

Dataset folders declare the registered variants (``cifar10/model.py`` ...) through
:func:`build_variant`; this module defines the networks themselves.
"""
import contextlib
import math
from functools import partial

import torch
from timm.layers import trunc_normal_
from timm.models import register_model
from torch import nn

from .layers import GlobalBlock, ImageNetLocalStage, PatchEmbed, SpikingTransformer, TokenSelfAttention, conv3x3
from .memory import saving_memory
from .neuron import (apply_neuron_backend, check_neuron_request, choose_neuron, neuron_implementation, reset_neurons,
                     use_neuron_implementation)

# Constructor keywords of the authors' models that their code accepts and never uses, and timm's
# own keywords for hub weights. Accepted so that the authors' calls and timm.create_model work.
IGNORED_KWARGS = frozenset({
    'qkv_bias', 'qk_scale', 'drop_rate', 'attn_drop_rate', 'drop_path_rate', 'norm_layer', 'sr_ratios',
    'patch_size', 'pretrained_cfg', 'pretrained_cfg_overlay', 'cache_dir',
})


class SpikingModel(nn.Module):
    """Base of every SGLFormer: neurons are reset at the start of each forward, and the neurons asked for
    (``neuron``: ``spikingjelly``, ``fused`` or ``auto``; ``neuron_backend``: ``auto`` or a backend of the
    installed spikingjelly, see :mod:`sglformer.neuron`) are settled by
    :func:`sglformer.neuron.choose_neuron` when the model first sees an input on a device.

    With ``recompute`` (the default) a training forward runs inside :func:`sglformer.memory.saving_memory`:
    the spiking units keep less for the backward pass and compute the same numbers.
    """

    family = None  # the kind of data it takes: 'cifar' (images), 'events' (frames) or 'imagenet' (images)

    def __init__(self, num_classes, num_features, in_channels, img_size, neuron_backend='auto', recompute=True):
        super().__init__()
        self.recompute = recompute
        self.num_classes = num_classes
        self.num_features = num_features
        self.in_channels = in_channels
        self.img_size = img_size
        self.neuron_backend = 'auto' if neuron_backend is None else neuron_backend
        check_neuron_request('auto', self.neuron_backend)
        self._neuron_request = 'spikingjelly'
        self._neuron_device = None

    def _new_head(self):
        # Subclasses assign it last, where the authors' state dicts have it.
        return nn.Linear(self.num_features, self.num_classes) if self.num_classes > 0 else nn.Identity()

    def set_neuron_backend(self, backend):
        """Ask for a neuron backend (``None``: ``auto``); it is settled at the next forward."""
        backend = 'auto' if backend is None else backend
        check_neuron_request('auto', backend)
        self.neuron_backend = backend
        self._neuron_device = None

    def set_neuron(self, implementation):
        """Switch every neuron to ``spikingjelly`` or ``fused`` in place (same numbers, same state dict), or
        ask for ``auto``, which the next forward settles for its device."""
        check_neuron_request(implementation)
        if implementation != 'auto':
            use_neuron_implementation(self, implementation)
        self._neuron_request = implementation
        self._neuron_device = None

    @property
    def neuron(self):
        """The neuron implementation in use: ``spikingjelly``, ``fused`` or ``mixed``."""
        return neuron_implementation(self)

    def _settle_neurons(self, device):
        choice = choose_neuron(self._neuron_request, self.neuron_backend, device)
        if self._neuron_request == 'auto' and self.neuron != choice.implementation:
            use_neuron_implementation(self, choice.implementation)
        apply_neuron_backend(self, choice.backend)
        self._neuron_device = device

    def reset_neurons(self):
        reset_neurons(self)

    def input_shape(self, batch_size: int) -> tuple:
        """The shape of a batch of inputs: images ``[B, C, H, W]``, or event frames ``[B, T, C, H, W]``."""
        steps = (self.T,) if self.family == 'events' else ()
        return (batch_size, *steps, self.in_channels, *self.img_size)

    def get_classifier(self):
        return self.head

    def reset_classifier(self, num_classes):
        self.num_classes = num_classes
        self.head = self._new_head()
        _init_weights(self.head)

    def forward_head(self, features):
        return self.head(features)

    def forward(self, x):
        if x.device != self._neuron_device:
            # Settled once per device and after set_neuron/set_neuron_backend, not on every forward.
            self._settle_neurons(x.device)
        self.reset_neurons()
        saving = self.recompute and self.training and torch.is_grad_enabled()
        with saving_memory() if saving else contextlib.nullcontext():
            return self.forward_head(self.forward_features(x))


def _init_weights(module):
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _halved(size, times):
    """Size after ``times`` MaxPool2d(3, 2, 1), each giving ceil(size / 2)."""
    for _ in range(times):
        size = math.ceil(size / 2)
    return size


class SGLFormer(SpikingModel):
    """The CIFAR and DVS network (the authors' ``vit_snn``).

    ``frame_input=False``: images ``[B, C, H, W]`` repeated over T steps (direct encoding);
    ``frame_input=True``: event frames ``[B, T, C, H, W]``. ``tokenizer_stride`` is 1 for CIFAR
    (H/4 x W/4 tokens) and 2 for DVS (H/16 x W/16).
    """

    def __init__(self, img_size_h: int = 32, img_size_w: int = 32, in_channels: int = 3, num_classes: int = 10,
                 embed_dims: int = 384, num_heads: int = 16, mlp_ratios: float = 4, depths: int = 1, T: int = 4,
                 tokenizer_stride: int = 1, frame_input: bool = False, neuron_backend: str = 'auto',
                 neuron: str = 'spikingjelly', recompute: bool = True):
        super().__init__(num_classes, embed_dims, in_channels, (img_size_h, img_size_w), neuron_backend, recompute)
        dim = embed_dims
        self.T = T
        self.frame_input = frame_input
        self.family = 'events' if frame_input else 'cifar'
        self.stem = nn.Module()
        self.stem.conv = conv3x3(in_channels, dim // 6, recompute_conv=True)
        self.tokenizer = nn.Module()
        self.tokenizer.conv1 = conv3x3(dim // 6, dim // 4, tokenizer_stride)
        self.tokenizer.conv2 = conv3x3(dim // 4, dim // 2, tokenizer_stride)
        self.tokenizer.conv3 = conv3x3(dim // 2, dim, 2)
        self.tokenizer.conv4 = conv3x3(dim, dim, 2)
        self.blocks = nn.Sequential(*[SpikingTransformer(dim, num_heads, mlp_ratios) for _ in range(depths)])
        halvings = 2 + 2 * (tokenizer_stride == 2)
        self.num_patches = _halved(img_size_h, halvings) * _halved(img_size_w, halvings)
        # The STB head: one depth-wise kernel spanning all tokens and all time steps.
        self.full_size_conv = nn.Conv2d(dim, dim, kernel_size=(self.num_patches, T), groups=dim)
        self.bn = nn.BatchNorm2d(dim)
        self.head = self._new_head()
        self.apply(_init_weights)
        self.set_neuron(neuron)

    def forward_features(self, x):
        if self.frame_input:
            x = x.transpose(0, 1)
        else:
            x = x.unsqueeze(0).repeat(self.T, 1, 1, 1, 1)
        batch = x.shape[1]
        x = self.stem.conv(x)
        for conv in (self.tokenizer.conv1, self.tokenizer.conv2, self.tokenizer.conv3, self.tokenizer.conv4):
            x = conv(x)
        x = self.blocks(x).flatten(3).permute(1, 2, 3, 0)  # [B, C, N, T]
        return self.bn(self.full_size_conv(x)).reshape(batch, -1)


class SGLFormerImageNet(SpikingModel):
    """The ImageNet networks ``sglformer_ima`` and ``sglformer_ima2`` (they differ in the tokenizer)."""

    POOLED_STAGES = {'ima': (0, 1, 2, 3), 'ima2': (1, 2, 3, 4)}
    family = 'imagenet'

    def __init__(self, arch: str = 'ima', img_size_h: int = 224, img_size_w: int = 224, in_channels: int = 3,
                 num_classes: int = 1000, embed_dims: int = 512, num_heads: int = 8, mlp_ratios: float = 4,
                 depths: int = 8, T: int = 4, neuron_backend: str = 'auto', neuron: str = 'spikingjelly',
                 per_image_neurons: bool = False, recompute: bool = True):
        super().__init__(num_classes, embed_dims, in_channels, (img_size_h, img_size_w), neuron_backend, recompute)
        if arch not in self.POOLED_STAGES:
            raise ValueError(f"arch must be one of {', '.join(self.POOLED_STAGES)}, got {arch!r}")
        if depths < 2:
            raise ValueError(f'depths counts the local stage and the global blocks and must be at least 2, got {depths}')
        self.T = T
        self.patch_embed = PatchEmbed(in_channels, embed_dims, self.POOLED_STAGES[arch], merged_first_lif=arch == 'ima2')
        self.localblock = nn.ModuleList([ImageNetLocalStage(embed_dims, num_heads, mlp_ratios)])
        self.blocks = nn.ModuleList([GlobalBlock(embed_dims, num_heads, mlp_ratios) for _ in range(depths - 2)])
        self.head = self._new_head()
        self.apply(_init_weights)
        self.set_neuron(neuron)
        self.set_per_image_neurons(per_image_neurons)

    def set_per_image_neurons(self, per_image: bool) -> None:
        """Run every neuron per image (True), or, as the authors' models and their checkpoints, the two that
        run over T*B steps so that an image's output depends on the images before it in the batch (False)."""
        self.per_image_neurons = per_image
        for module in self.modules():
            if isinstance(module, (TokenSelfAttention, PatchEmbed)):
                module.per_image_neurons = per_image

    def forward_features(self, x):
        x = self.patch_embed(x.unsqueeze(0).repeat(self.T, 1, 1, 1, 1))
        for stage in self.localblock:
            x = stage(x)
        x = x.flatten(3)
        for block in self.blocks:
            x = block(x)
        return x.mean(-1).mean(0)


def build_variant(model_cls, defaults, pretrained=False, **kwargs):
    """Build ``model_cls`` with a registered variant's ``defaults`` overridden by ``kwargs``.

    ``kwargs`` use the authors' constructor names; their unused ones and timm's hub keywords are
    dropped. There are no hosted weights: load a file with :func:`sglformer.load_checkpoint`.
    """
    if pretrained:
        raise ValueError('SGLFormer weights are not downloaded automatically; build the model with '
                         'pretrained=False and load a file with sglformer.load_checkpoint(model, path)')
    arguments = dict(defaults)
    arguments.update({k: v for k, v in kwargs.items() if k not in IGNORED_KWARGS})
    return model_cls(**arguments)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())



def register_variant(namespace, name, model_cls, defaults, doc):
    """Define the timm entrypoint ``name`` in a folder's ``model.py`` (its ``globals()``) and register it."""
    build = partial(build_variant, model_cls, defaults)

    def entrypoint(pretrained=False, **kwargs):
        return build(pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = namespace['__name__']
    entrypoint.__doc__ = doc
    namespace[name] = register_model(entrypoint)
    return entrypoint
