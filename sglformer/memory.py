"""What the spiking units keep for the backward pass: less than PyTorch would, with the same numbers, for
every neuron kernel (spikingjelly's, of any backend, and the fused one). docs/performance.md has the
tensors and their sizes.

Inside :func:`saving_memory`, which the models enter in training (``recompute``, on by default):

* A Conv-BN-LIF unit without a pool keeps only its convolution's output, which BatchNorm's backward needs
  anyway; the backward pass recomputes BatchNorm's output and the neuron's membranes from it
  (:func:`recomputed_unit`). A unit whose input is the network's input keeps that input instead (three
  image channels, or two event channels, against tens to hundreds of output channels) and recomputes
  its convolution too.
* A pooled unit keeps the pool's indices (16 bits where a plane is small enough, else 32) but not its
  input (:func:`max_pool`).
* Spikes are exactly 0 or 1, and the residual sums of spikes small whole numbers: a layer that saves one
  of them (a convolution, a matrix product) keeps it as bool or uint8, turned back into its dtype when
  the backward pass needs it.

Recomputing gives the numbers of the first computation: BatchNorm updates its running statistics once,
in the forward pass, and the neuron starts again from the membrane it started from.
"""
import contextlib
import threading
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .neuron import FusedLIFNode, initial_membrane, recomputable_neuron

_active = threading.local()


class _SavedCompactly:
    """The live tensors known to hold spikes (bool) or small counts (uint8), and their compact copies, for
    the saved-tensor hooks."""

    def __init__(self):
        self._known = {}

    def add(self, tensor, dtype):
        if tensor.numel() and tensor.is_contiguous() and tensor.storage_offset() == 0:
            self._known[tensor.untyped_storage().data_ptr()] = [weakref.ref(tensor), tensor._version, None, dtype]

    def pack(self, tensor):
        entry = self._known.get(tensor.untyped_storage().data_ptr()) if tensor.numel() else None
        if entry is not None:
            ref, version, compact, dtype = entry
            known = ref()
            # A live tensor owns the storage at that address; a view of it with the same dtype and an
            # unchanged version counter still holds its values, at the same element offsets.
            if known is not None and tensor.dtype == known.dtype and tensor._version == version:
                if compact is None:
                    compact = entry[2] = torch.empty_like(known, dtype=dtype).copy_(known)
                    if dtype is torch.uint8 and not torch.equal(compact.to(known.dtype), known):
                        compact = entry[2] = False  # not whole numbers from 0 to 255 after all
                if compact is not False:
                    return compact.as_strided(tensor.shape, tensor.stride(), tensor.storage_offset()), tensor.dtype
        return tensor.detach()

    @staticmethod
    def unpack(packed):
        if isinstance(packed, tuple):
            compact, dtype = packed
            return compact.view(torch.uint8).to(dtype)  # from bytes: several times faster than from booleans
        return packed


@contextlib.contextmanager
def saving_memory():
    """Within this context spiking units recompute what they can and saved spikes and counts are compact."""
    outer = getattr(_active, 'store', None)
    store = _SavedCompactly()
    _active.store = store
    try:
        with torch.autograd.graph.saved_tensors_hooks(store.pack, store.unpack):
            yield
    finally:
        _active.store = outer


def _remember(tensor, dtype):
    store = getattr(_active, 'store', None)
    if store is not None:
        store.add(tensor, dtype)
    return tensor


def spikes(tensor):
    """``tensor`` (a neuron's output), kept as booleans where a layer saves it inside :func:`saving_memory`."""
    return _remember(tensor, torch.bool)


def counts(tensor):
    """``tensor`` (a sum of spikes), kept as uint8 where a layer saves it inside :func:`saving_memory`."""
    return _remember(tensor, torch.uint8)


def _hooked(module):
    return module is not None and bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                                       or module._backward_pre_hooks)


def recomputes(bn, lif, *modules):
    """Whether a unit of these modules recomputes now: inside :func:`saving_memory`, in training with a graph,
    BatchNorm on batch statistics, a neuron that can start again from a membrane, and no hooks (they would
    see tensors without a graph)."""
    return (getattr(_active, 'store', None) is not None and torch.is_grad_enabled() and bn.training
            and bn.track_running_stats and bn.running_mean is not None and recomputable_neuron(lif)
            and not any(_hooked(module) for module in (bn, lif, *modules)))


class _RecomputedUnit(torch.autograd.Function):
    """``lif(to_sequence(pool(bn(conv(x)))))`` (``conv`` and ``pool`` may be None) and the neuron's final
    membrane, computed without a graph; only ``x`` and a carried membrane ``v`` are kept, and the backward
    pass computes it again with one (on scratch copies of BatchNorm's running statistics)."""

    @staticmethod
    def forward(ctx, unit, x, v, *parameters):
        conv, bn, pool, lif, to_sequence = unit
        ctx.unit, ctx.membrane = unit, lif.v
        ctx.save_for_backward(x, v, *parameters)
        ctx.autocast = dict(device_type=x.device.type, dtype=torch.get_autocast_dtype(x.device.type),
                            enabled=torch.is_autocast_enabled(x.device.type))
        ctx.set_materialize_grads(False)
        out = bn(conv(x) if conv is not None else x)
        return lif(to_sequence(pool(out) if pool is not None else out)), lif.v

    @staticmethod
    def backward(ctx, grad_spikes, grad_v):
        conv, bn, pool, lif, to_sequence = ctx.unit
        inputs = [None if t is None else t.detach().requires_grad_(needed)
                  for t, needed in zip(ctx.saved_tensors, ctx.needs_input_grad[1:])]
        x, v, *parameters = inputs
        conv_parameters, (weight, bias) = parameters[:-2], parameters[-2:]
        with torch.enable_grad(), torch.autocast(**ctx.autocast):
            y = conv._conv_forward(x, *conv_parameters) if conv is not None else x
            out = F.batch_norm(y, bn.running_mean.clone(), bn.running_var.clone(), weight, bias, True, 0., bn.eps)
            x_seq = to_sequence(pool(out) if pool is not None else out)
            membrane = initial_membrane(lif, ctx.membrane if v is None else v, x_seq)
            if isinstance(lif, FusedLIFNode):  # its own backward, in x_seq's memory
                grads = lif.input_gradient(x_seq.detach(), membrane.detach(), grad_spikes, grad_v,
                                           membrane.requires_grad)
                outputs, grads = [x_seq, membrane], list(grads)
            else:
                outputs, grads = [*_fire_again(lif, x_seq, membrane)], [grad_spikes, grad_v]
        kept = [(t, g) for t, g in zip(outputs, grads) if g is not None and t.requires_grad]
        wanted = [t for t in inputs if t is not None and t.requires_grad]
        found = iter(torch.autograd.grad([t for t, _ in kept], wanted, [g for _, g in kept], allow_unused=True))
        return (None,) + tuple(next(found) if t is not None and t.requires_grad else None for t in inputs)


def _fire_again(lif, x_seq, membrane):
    """A spikingjelly neuron's spikes and final membrane on ``x_seq`` from ``membrane``, with a graph; the
    module's own state is left as it was."""
    state = lif.v
    try:
        lif.v = membrane
        return lif(x_seq), lif.v
    finally:
        lif.v = state


def recomputed_unit(conv, bn, pool, lif, x, to_sequence):
    """The spikes of the unit ``lif(to_sequence(pool(bn(conv(x)))))`` keeping only ``x`` for the backward
    pass (see :class:`_RecomputedUnit`); ``conv`` is None where ``x`` is the convolution's output."""
    membrane = lif.v if isinstance(lif.v, torch.Tensor) else None
    conv_parameters = () if conv is None else (conv.weight, conv.bias)
    fired, lif.v = _RecomputedUnit.apply((conv, bn, pool, lif, to_sequence), x, membrane, *conv_parameters,
                                         bn.weight, bn.bias)
    return spikes(fired)


class _MaxPoolKeepingIndices(torch.autograd.Function):
    """A 2D max pool whose backward pass keeps only the indices, as int16 where an input plane has at most
    65,536 elements (offset by 32,768 above 32,767) and int32 otherwise. The pool's backward reads its
    input's shape and strides, never its values, so ``like``, a tensor of the same shape and strides that
    is kept anyway, stands in for the input."""

    @staticmethod
    def forward(ctx, x, like, options):
        out, indices = torch.ops.aten.max_pool2d_with_indices(x, *options)
        plane = x.shape[-2] * x.shape[-1]
        ctx.offset = 32768 if 32768 <= plane <= 65536 else 0
        compact = torch.int16 if plane <= 65536 else torch.int32
        ctx.save_for_backward((indices - ctx.offset).to(compact), like)
        ctx.options = options
        return out

    @staticmethod
    def backward(ctx, grad):
        indices, like = ctx.saved_tensors
        kernel_size, stride, padding, dilation, ceil_mode = ctx.options
        return (torch.ops.aten.max_pool2d_with_indices_backward(grad, like, kernel_size, stride, padding, dilation,
                                                                 ceil_mode, indices.long() + ctx.offset), None, None)


def max_pool(pool, x, like):
    """``pool(x)`` for a ``MaxPool2d``, keeping for the backward pass only compact indices and ``like`` (see
    :class:`_MaxPoolKeepingIndices`) inside :func:`saving_memory` where that holds; the module otherwise."""
    if not (getattr(_active, 'store', None) is not None and torch.is_grad_enabled() and x.requires_grad
            and type(pool) is nn.MaxPool2d and not pool.return_indices and not _hooked(pool)
            and like.shape == x.shape and like.stride() == x.stride() and x.shape[-2] * x.shape[-1] < 2 ** 31):
        return pool(x)
    pair = nn.modules.utils._pair
    options = (pair(pool.kernel_size), pair(pool.stride if pool.stride is not None else pool.kernel_size),
               pair(pool.padding), pair(pool.dilation), pool.ceil_mode)
    return _MaxPoolKeepingIndices.apply(x, like, options)
