"""Spiking building units shared by every SGLFormer variant.

Tensors are time first: ``[T, B, C, H, W]`` for maps, ``[T, B, C, N]`` for token sequences.
Attribute names are the authors' state-dict keys and must not change.
"""
from torch import nn

from . import memory
from .neuron import create_lif

ATTENTION_SCALE = 0.125  # the authors' constant, whatever the head size
ATTENTION_THRESHOLD = 0.5


def merge_time(x):
    """``[T, B, ...] -> [T*B, ...]`` for layers without a time axis."""
    return x.flatten(0, 1)


def split_time(x, steps):
    """Inverse of :func:`merge_time`."""
    return x.reshape(steps, -1, *x.shape[1:])


def kv_first(head_dim, tokens):
    """Whether :func:`spike_attention` computes ``kᵀ v`` first (the cheaper order for these sizes)."""
    return head_dim <= tokens


def spike_attention(q, k, v, num_heads):
    """Multi-head spiking attention without softmax: ``(q kᵀ) v * 0.125`` per head.

    ``q, k, v`` are ``[T, B, C, N]`` with channel ``c`` in head ``c // (C / num_heads)``. The result
    has the same layout. Inputs are spikes, so every product is a small integer and the association
    does not change the forward values: the cheaper of ``(q kᵀ) v`` and ``q (kᵀ v)`` is used.
    """
    steps, batch, channels, tokens = q.shape
    head_dim = channels // num_heads
    # Feature-major per head ([.., head_dim, tokens]); with it the output needs no transposes:
    # out = v @ kᵀ @ q in this layout equals (q kᵀ) v in the token-major one.
    q, k, v = (t.reshape(steps, batch, num_heads, head_dim, tokens) for t in (q, k, v))
    if kv_first(head_dim, tokens):
        out = (v @ k.transpose(-2, -1) * ATTENTION_SCALE) @ q
    else:
        out = v @ (k.transpose(-2, -1) @ q * ATTENTION_SCALE)
    return out.reshape(steps, batch, channels, tokens)


class SpikeAttention(nn.Module):
    """:func:`spike_attention` as a parameter-free module, so that hooks (firing rates, energy) see
    the attention products like any other layer."""

    def __init__(self, num_heads):
        super().__init__()
        self.num_heads = num_heads

    def forward(self, q, k, v):
        return spike_attention(q, k, v, self.num_heads)

    def extra_repr(self):
        return f'num_heads={self.num_heads}'


def fire(lif, x_seq):
    """``lif(x_seq)``; a layer that saves the spikes keeps them as booleans (:mod:`sglformer.memory`)."""
    return memory.spikes(lif(x_seq))


def run_unit(conv, bn, pool, lif, x, merged_time_steps=False, recompute_conv=False):
    """``lif(pool(bn(conv(x))))`` for ``x = [T, B, ...]``, the layers without a time axis on ``[T*B, ...]``;
    the neuron gets ``[T, B, ...]``, or with ``merged_time_steps`` ``[T*B, ...]`` (T*B steps). ``pool`` may be None.

    Where :func:`sglformer.memory.recomputes`, a unit without a pool keeps only its convolution's output for
    the backward pass (with ``recompute_conv``, for the network's input, only the convolution's input) and
    a pooled unit the pool's indices but not its input; the numbers stay the same.
    """
    steps = x.shape[0]

    def to_sequence(t):
        return t if merged_time_steps else split_time(t, steps)
    flat = merge_time(x)
    if (recompute_conv or pool is None) and memory.recomputes(bn, lif, conv, pool):
        if recompute_conv:
            spikes = memory.recomputed_unit(conv, bn, pool, lif, flat, to_sequence)
        else:
            spikes = memory.recomputed_unit(None, bn, None, lif, conv(flat), to_sequence)
    else:
        y = conv(flat)
        out = bn(y)
        if pool is not None:
            out = memory.max_pool(pool, out, like=y)
        spikes = fire(lif, to_sequence(out))
    return split_time(spikes, steps) if merged_time_steps else spikes


class ConvBNLIF(nn.Module):
    """Conv2d -> BatchNorm2d -> [MaxPool2d(3, 2, 1)] -> LIF on ``[T, B, C, H, W]`` (see :func:`run_unit`).

    The pool sits between BN and the neuron (the paper's "Maxpooling module"). The convolution is
    stored as ``conv3x3`` or ``conv1x1`` after its kernel size, as in the authors' state dicts.
    """

    def __init__(self, in_channels, out_channels, kernel_size, groups=1, pool=False, recompute_conv=False):
        super().__init__()
        self.recompute_conv = recompute_conv
        self.conv_name = f'conv{kernel_size}x{kernel_size}'
        self.add_module(self.conv_name, nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=1, padding=kernel_size // 2, groups=groups, bias=False))
        self.bn = nn.BatchNorm2d(out_channels)
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if pool else None
        self.lif = create_lif()

    def forward(self, x):
        return run_unit(getattr(self, self.conv_name), self.bn, self.pool, self.lif, x,
                        recompute_conv=self.recompute_conv)


def conv3x3(in_channels, out_channels, stride=1, recompute_conv=False):
    """The authors' ``Conv3x3``; stride 2 is a max pool after BN, halving H and W."""
    return ConvBNLIF(in_channels, out_channels, 3, pool=stride == 2, recompute_conv=recompute_conv)


def dwconv3x3(channels):
    """The authors' ``DWConv3x3``: depth-wise 3x3."""
    return ConvBNLIF(channels, channels, 3, groups=channels)


def conv1x1(in_channels, out_channels):
    """The authors' ``Conv1x1``."""
    return ConvBNLIF(in_channels, out_channels, 1)


def mlp_hidden(dim, mlp_ratio):
    """The hidden width of a block's MLP: ``int(dim * mlp_ratio)``, as the authors round it."""
    hidden = int(dim * mlp_ratio)
    if hidden < 1:
        raise ValueError(f'mlp_ratio {mlp_ratio} x dim {dim} leaves the MLP no hidden channels: choose a larger '
                         'mlp_ratio')
    return hidden


class MLP(nn.Module):
    """Two 1x1 spiking convolutions, ``mlp1`` and ``mlp2``; the caller adds the residual."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.mlp1 = conv1x1(dim, hidden_dim)
        self.mlp2 = conv1x1(hidden_dim, dim)

    def forward(self, x):
        return self.mlp2(self.mlp1(x))


class LocalBlock(nn.Module):
    """Depth-wise conv with residual, then an inverted bottleneck (expansion 4) with residual."""

    def __init__(self, dim, expansion=4):
        super().__init__()
        hidden = int(expansion * dim)
        self.conv = dwconv3x3(dim)
        self.conv1x1_1 = conv1x1(dim, hidden)
        self.dwconv3x3 = dwconv3x3(hidden)
        self.conv1x1_2 = conv1x1(hidden, dim)

    def forward(self, x):
        x = memory.counts(x + self.conv(x))
        return memory.counts(x + self.conv1x1_2(self.dwconv3x3(self.conv1x1_1(x))))


def partition(x, size):
    """``[T, B, C, H, W] -> [T, B*size*size, C, H/size, W/size]``: pixel ``(i*size + a, j*size + b)``
    goes to group ``(a, b)`` at ``(i, j)``, so each group is a strided sub-grid of the map."""
    steps, batch, channels, height, width = x.shape
    if height % size or width % size:
        raise ValueError(f'local attention splits the {height}x{width} token grid into {size}x{size} groups, '
                         f'so both sides must be multiples of {size}: choose another input size')
    x = x.reshape(steps, batch, channels, height // size, size, width // size, size)
    x = x.permute(0, 1, 4, 6, 2, 3, 5)
    return x.reshape(steps, batch * size * size, channels, height // size, width // size)


def integrate(x, size):
    """Inverse of :func:`partition`."""
    steps, groups, channels, height, width = x.shape
    x = x.reshape(steps, groups // (size * size), size, size, channels, height, width)
    x = x.permute(0, 1, 4, 5, 2, 6, 3)
    return x.reshape(steps, groups // (size * size), channels, height * size, width * size)


class SpikingSelfAttention(nn.Module):
    """Spiking self-attention on maps ``[T, B, C, H, W]`` (the authors' ``GlobalSSA``/``LocalSSA``).

    With ``partition_size`` n > 1 (local attention) the map is split into n*n strided sub-grids
    that attend within themselves and are put back afterwards; n = 1 is global attention.
    """

    def __init__(self, dim, num_heads, partition_size=1):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'dim {dim} must be divisible by num_heads {num_heads}')
        self.num_heads = num_heads
        self.partition_size = partition_size
        self.q_conv = conv1x1(dim, dim)
        self.k_conv = conv1x1(dim, dim)
        self.v_conv = conv1x1(dim, dim)
        self.attention = SpikeAttention(num_heads)
        self.attn_lif = create_lif(ATTENTION_THRESHOLD)
        self.proj_conv = conv1x1(dim, dim)

    def forward(self, x):
        if self.partition_size > 1:
            x = memory.counts(partition(x, self.partition_size))
        shape = x.shape
        q, k, v = (conv(x).flatten(3) for conv in (self.q_conv, self.k_conv, self.v_conv))
        y = fire(self.attn_lif, self.attention(q, k, v))
        y = self.proj_conv(y.reshape(shape))
        if self.partition_size > 1:
            y = integrate(y, self.partition_size)
        return y


class SpikingTransformer(nn.Module):
    """The CIFAR/DVS block: local block, local attention, then two global attentions, each with an MLP."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0):
        super().__init__()
        hidden = mlp_hidden(dim, mlp_ratio)
        self.loc = LocalBlock(dim)
        self.ssa1 = SpikingSelfAttention(dim, num_heads, partition_size=2)
        self.mlp1 = MLP(dim, hidden)
        self.ssa2 = SpikingSelfAttention(dim, num_heads)
        self.mlp2 = MLP(dim, hidden)
        self.ssa3 = SpikingSelfAttention(dim, num_heads)
        self.mlp3 = MLP(dim, hidden)

    def forward(self, x):
        # loc adds its own residuals; the outer add is the authors' and changes the numbers.
        x = memory.counts(x + self.loc(x))
        for attn, mlp in ((self.ssa1, self.mlp1), (self.ssa2, self.mlp2), (self.ssa3, self.mlp3)):
            x = memory.counts(x + attn(x))
            x = memory.counts(x + mlp(x))
        return x


class ImageNetLocalStage(nn.Module):
    """The ImageNet network's first block (``localblock.0``): local block, local attention, MLP."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.local1 = LocalBlock(dim)
        self.local2_SSA = SpikingSelfAttention(dim, num_heads, partition_size=2)
        self.local2_MLP = MLP(dim, mlp_hidden(dim, mlp_ratio))

    def forward(self, x):
        x = memory.counts(x + self.local1(x))
        x = memory.counts(x + self.local2_SSA(x))
        return memory.counts(x + self.local2_MLP(x))


def add_token_unit(owner, prefix, in_channels, out_channels, bias, threshold=1.0):
    """Register Conv1d(1x1), BatchNorm1d and LIF on ``owner`` as ``{prefix}_conv``, ``{prefix}_bn``,
    ``{prefix}_lif``: the ImageNet blocks keep these flat names in their state dicts."""
    owner.add_module(f'{prefix}_conv', nn.Conv1d(in_channels, out_channels, 1, bias=bias))
    owner.add_module(f'{prefix}_bn', nn.BatchNorm1d(out_channels))
    owner.add_module(f'{prefix}_lif', create_lif(threshold))


def run_token_unit(owner, prefix, x, merged_time_steps=False):
    """Conv -> BN -> LIF of a unit made by :func:`add_token_unit`, on tokens ``[T, B, C, N]``.

    With ``merged_time_steps`` the neuron runs on ``[T*B, C, N]``: T*B steps in which the membrane
    carries over from one image to the next. That is the authors' ``proj_lif``, reproduced on purpose.
    """
    return run_unit(*(getattr(owner, f'{prefix}_{name}') for name in ('conv', 'bn')), None,
                    getattr(owner, f'{prefix}_lif'), x, merged_time_steps)


class TokenSelfAttention(nn.Module):
    """Spiking self-attention on tokens ``[T, B, C, N]`` (the ImageNet ``attn``), with flat names
    ``q_*``, ``k_*``, ``v_*``, ``attn_lif`` and ``proj_*``. Its ``proj_lif`` runs over T*B steps, as the
    authors', unless ``per_image_neurons``."""

    per_image_neurons = False

    def __init__(self, dim, num_heads):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'dim {dim} must be divisible by num_heads {num_heads}')
        self.num_heads = num_heads
        for name in ('q', 'k', 'v'):
            add_token_unit(self, name, dim, dim, bias=False)
        self.attention = SpikeAttention(num_heads)
        self.attn_lif = create_lif(ATTENTION_THRESHOLD)
        add_token_unit(self, 'proj', dim, dim, bias=True)
        self.qkv_mp = nn.MaxPool1d(4)  # never used; kept so that printed models match the authors'

    def forward(self, x):
        q, k, v = (run_token_unit(self, name, x) for name in ('q', 'k', 'v'))
        y = fire(self.attn_lif, self.attention(q, k, v))
        return run_token_unit(self, 'proj', y, merged_time_steps=not self.per_image_neurons)


class TokenMLP(nn.Module):
    """``fc1_*`` and ``fc2_*``: two spiking 1x1 convolutions with bias on tokens ``[T, B, C, N]``."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        add_token_unit(self, 'fc1', dim, hidden_dim, bias=True)
        add_token_unit(self, 'fc2', hidden_dim, dim, bias=True)

    def forward(self, x):
        return run_token_unit(self, 'fc2', run_token_unit(self, 'fc1', x))


class GlobalBlock(nn.Module):
    """An ImageNet global block. ``norm1``/``norm2`` are in the authors' state dicts and parameter
    counts but never used; they are frozen so that no optimiser or DDP waits for their gradients."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = TokenSelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = TokenMLP(dim, mlp_hidden(dim, mlp_ratio))
        for norm in (self.norm1, self.norm2):
            norm.requires_grad_(False)

    def forward(self, x):
        x = memory.counts(x + self.attn(x))
        return memory.counts(x + self.mlp(x))


class PatchEmbed(nn.Module):
    """The ImageNet tokenizer: five 3x3 Conv-BN-LIF stages (channels D/8, D/4, D/2, D, D) under the
    flat names ``proj_*``, ``proj1_*`` .. ``proj4_*``, with MaxPool2d(3, 2, 1) between BN and LIF of
    the stages listed in ``pooled_stages`` (module names ``maxpool``, ``maxpool1``, ...).

    ``merged_first_lif`` reproduces ``sglformer_ima2``: its stage-0 neuron runs over T*B steps, unless
    ``per_image_neurons``.
    """

    PREFIXES = ('proj', 'proj1', 'proj2', 'proj3', 'proj4')
    per_image_neurons = False

    def __init__(self, in_channels, embed_dim, pooled_stages, merged_first_lif=False):
        super().__init__()
        widths = (embed_dim // 8, embed_dim // 4, embed_dim // 2, embed_dim, embed_dim)
        self.pooled_stages = tuple(pooled_stages)
        self.merged_first_lif = merged_first_lif
        for stage, (prefix, width) in enumerate(zip(self.PREFIXES, widths)):
            self.add_module(f'{prefix}_conv', nn.Conv2d(in_channels, width, 3, 1, 1, bias=False))
            self.add_module(f'{prefix}_bn', nn.BatchNorm2d(width))
            if stage in self.pooled_stages:
                self.add_module(self._pool_name(stage), nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
            self.add_module(f'{prefix}_lif', create_lif())
            in_channels = width

    @staticmethod
    def _pool_name(stage):
        return f'maxpool{stage or ""}'

    def forward(self, x):
        for stage, prefix in enumerate(self.PREFIXES):
            pool = getattr(self, self._pool_name(stage)) if stage in self.pooled_stages else None
            merged = stage == 0 and self.merged_first_lif and not self.per_image_neurons
            x = run_unit(getattr(self, f'{prefix}_conv'), getattr(self, f'{prefix}_bn'), pool,
                         getattr(self, f'{prefix}_lif'), x, merged, recompute_conv=stage == 0)
        return x
