"""The arithmetic of the fused multi-step LIF neuron (:class:`sglformer.neuron.FusedLIFNode`), free of
any spikingjelly version: spikingjelly's ``LIFNode`` as SGLFormer configures it, bit for bit, in one
autograd function per layer.

spikingjelly's Torch neurons build about a dozen autograd nodes per time step and keep two float
tensors per element for the backward pass (the surrogate's input and ``1 - spike``), plus the float
spikes stacked into the output. :class:`_MultiStepLIF` runs the same recurrence with the same
floating-point operations in the same order, so spikes, membranes and gradients are identical
(``torch.equal``), but keeps one float per element (``H[t] - v_threshold``, from which the spikes follow).

Two further savings keep the numbers:

* Spikes are exactly 0 or 1, so a layer that consumes them and saves its input for the backward pass
  (a convolution, a matrix product) need not keep them as floats: inside :func:`compact_spike_saving`,
  saved tensors that view a fused neuron's output are kept as booleans and turned back into floats
  when the backward pass needs them.
* Conv-BN-LIF units (:func:`norm_fire`) keep only the convolution's output, which BatchNorm's backward
  needs anyway; the backward pass recomputes BatchNorm's output and the neuron's membranes from it.

The models enter :func:`compact_spike_saving` themselves when they hold fused neurons.
"""
import contextlib
import threading
import weakref

import torch
import torch.nn.functional as F
from torch import nn


class _MultiStepLIF(torch.autograd.Function):
    """Hard-reset LIF over ``x_seq[0], x_seq[1], ...`` with spikingjelly's arithmetic:

    charge ``H = V + (X - V) / tau``; fire ``S = (H - v_threshold >= 0)``; reset ``V = H`` where
    ``S == 0`` and ``0`` where ``S == 1``, the reset detached from the graph; surrogate gradient
    ``dS/dH = (1 - sigmoid(alpha z)) sigmoid(alpha z) alpha`` at ``z = H - v_threshold``.

    With ``scaled_surrogate`` the incoming gradient is multiplied by the finished derivative
    ``(1 - s) s alpha`` instead of by its factors left to right: spikingjelly 2 does so on float32.

    Returns the spikes (dtype of ``x_seq``) and the final membrane.
    """

    @staticmethod
    def forward(ctx, x_seq, v, v_threshold, tau, alpha, scaled_surrogate):
        # Buffers are allocated once and written in place: fresh memory costs page faults on the CPU.
        z_seq = torch.empty_like(x_seq)
        spikes = torch.empty_like(x_seq)
        v = _recurrence(x_seq, v, v_threshold, tau, z_seq.__getitem__, spikes)
        ctx.save_for_backward(z_seq)
        ctx.lif = (tau, alpha, scaled_surrogate)
        ctx.set_materialize_grads(False)
        return spikes, v

    @staticmethod
    def backward(ctx, grad_spikes, grad_v):
        z_seq, = ctx.saved_tensors
        silent = torch.empty_like(z_seq[0])
        grad_x, grad_v = _gradients_through_time(
            z_seq, lambda t: torch.lt(z_seq[t], 0., out=silent), grad_spikes, grad_v, *ctx.lif,
            ctx.needs_input_grad[1], torch.empty_like(z_seq))
        return grad_x, grad_v, None, None, None, None


def _recurrence(x_seq, v, v_threshold, tau, z_at, spikes=None, silent_out=None):
    """Runs the neuron from membrane ``v`` (never written to) and returns the final membrane. Each step's
    ``z = H - v_threshold`` goes to ``z_at(t)`` (which may be ``x_seq[t]``: a step reads its input before
    writing), its spikes to ``spikes[t]`` and its silent neurons, as booleans, to ``silent_out[t]``.

    Masks are floats: on the CPU, comparisons into float tensors and multiplications by them run several
    times faster than boolean masks, with the same values (``V * 1 = V``, and ``V * 0 = 0`` where
    ``V >= v_threshold``)."""
    silent = torch.empty_like(x_seq[0])
    for t in range(x_seq.shape[0]):
        z = z_at(t)  # holds (X - V) / tau until it takes H - v_threshold
        torch.sub(x_seq[t], v, out=z).div_(tau)
        v = v + z if t == 0 else v.add_(z)
        torch.sub(v, v_threshold, out=z)
        if spikes is not None:
            torch.ge(z, 0., out=spikes[t])
        v.mul_(torch.lt(z, 0., out=silent))
        if silent_out is not None:
            silent_out[t].copy_(silent)
    return v


def _gradients_through_time(z_seq, silent, grad_spikes, grad_v, tau, alpha, scaled_surrogate, initial_v_grad,
                            grad_x):
    """``(grad x_seq, grad initial membrane)`` from the steps' ``z = H - v_threshold``; ``silent(t)`` is the
    float mask of the neurons that did not fire at step ``t``. ``grad_x`` receives the first and may be
    ``z_seq``: each step reads its ``z`` before writing. One step at a time, with buffers of one step,
    which on the CPU stay in the C library's heap where whole sequences would be mapped afresh."""
    sg, grad_h, carried = (torch.empty_like(z_seq[0]) for _ in range(3))
    for t in reversed(range(z_seq.shape[0])):
        # The sigmoid of one time step at a time, as spikingjelly: on the CPU its last bit depends on where an
        # element falls in the vectorised loop.
        torch.mul(z_seq[t], alpha, out=sg).sigmoid_()
        if grad_spikes is None:
            grad_h.zero_()
        elif scaled_surrogate:
            torch.neg(sg, out=grad_h).add_(1.).mul_(sg).mul_(alpha).mul_(grad_spikes[t])
        else:  # spikingjelly's sigmoid_backward: grad * (1 - sg) * sg * alpha, left to right
            torch.neg(sg, out=grad_h).add_(1.).mul_(grad_spikes[t]).mul_(sg).mul_(alpha)
        if grad_v is not None:
            # Through the detached reset V = H * (1 - S): the membrane's gradient where no spike fired.
            grad_h.add_(torch.mul(grad_v, silent(t), out=carried))
        torch.div(grad_h, tau, out=grad_x[t])
        # V[t-1] enters H = V + (X - V) / tau twice: dV = dH - dH / tau.
        grad_v = torch.sub(grad_h, grad_x[t], out=carried) if t > 0 or initial_v_grad else None
    return grad_x, grad_v


def lif_input_gradient(x_seq, v, v_threshold, tau, alpha, scaled_surrogate, grad_spikes, grad_v, initial_v_grad):
    """``(grad x_seq, grad v or None)`` of the LIF of :class:`_MultiStepLIF` run from membrane ``v`` on
    ``x_seq``, given the gradients of its spikes and final membrane (either may be ``None``). The
    membranes are recomputed in ``x_seq``'s memory, which ends up holding the first gradient."""
    silent_steps = torch.empty_like(x_seq, dtype=torch.bool)
    _recurrence(x_seq, v, v_threshold, tau, x_seq.__getitem__, silent_out=silent_steps)
    silent = torch.empty_like(x_seq[0])
    return _gradients_through_time(x_seq, lambda t: silent.copy_(silent_steps[t].view(torch.uint8)), grad_spikes,
                                   grad_v, tau, alpha, scaled_surrogate, initial_v_grad, x_seq)


def _lif_inference(x_seq, v, v_threshold, tau):
    """:class:`_MultiStepLIF`'s forward without a graph."""
    spikes = torch.empty_like(x_seq)
    step = torch.empty_like(x_seq[0])
    return spikes, _recurrence(x_seq, v, v_threshold, tau, lambda t: step, spikes)


def multi_step_lif(x_seq, v, v_threshold, tau, alpha, scaled_surrogate=False):
    """``(spikes, final membrane)`` of the LIF of :class:`_MultiStepLIF` from membrane ``v``; with a
    graph only where a gradient is needed. Inside :func:`compact_spike_saving` the spikes are registered
    so that layers saving them keep booleans."""
    if torch.is_grad_enabled() and (x_seq.requires_grad or v.requires_grad):
        spikes, v = _MultiStepLIF.apply(x_seq, v, v_threshold, tau, alpha, scaled_surrogate)
    else:
        spikes, v = _lif_inference(x_seq, v, v_threshold, tau)
    _register_spikes(spikes)
    return spikes, v


class _NormFire(torch.autograd.Function):
    """``lif(to_sequence(bn(y)))`` and the neuron's final membrane, from the modules of ``unit = (bn, lif,
    to_sequence)`` called without a graph; only ``y`` (and a carried membrane ``v``) is kept. The backward
    pass recomputes BatchNorm with autograd (on scratch copies of its running statistics) and the neuron
    with :func:`lif_input_gradient`."""

    @staticmethod
    def forward(ctx, unit, y, v, weight, bias):
        bn, lif, to_sequence = unit
        ctx.unit, ctx.membrane = unit, lif.v
        ctx.save_for_backward(y, v, weight, bias)
        ctx.autocast = dict(device_type=y.device.type, dtype=torch.get_autocast_dtype(y.device.type),
                            enabled=torch.is_autocast_enabled(y.device.type))
        ctx.set_materialize_grads(False)
        return lif(to_sequence(bn(y))), lif.v

    @staticmethod
    def backward(ctx, grad_spikes, grad_v):
        bn, lif, to_sequence = ctx.unit
        inputs = [None if t is None else t.detach().requires_grad_(needed)
                  for t, needed in zip(ctx.saved_tensors, ctx.needs_input_grad[1:])]
        y, v, weight, bias = inputs
        with torch.enable_grad(), torch.autocast(**ctx.autocast):
            x_seq = to_sequence(F.batch_norm(y, bn.running_mean.clone(), bn.running_var.clone(), weight, bias,
                                             True, 0., bn.eps))
            membrane = lif.initial_membrane(ctx.membrane if v is None else v, x_seq)
        grad_x, grad_membrane = lif.input_gradient(x_seq.detach(), membrane.detach(), grad_spikes, grad_v,
                                                   membrane.requires_grad)
        outputs, grads = ([x_seq, membrane], [grad_x, grad_membrane]) if membrane.requires_grad else ([x_seq], [grad_x])
        wanted = [t for t in inputs if t is not None and t.requires_grad]
        found = iter(torch.autograd.grad(outputs, wanted, grads, allow_unused=True))
        return (None,) + tuple(next(found) if t is not None and t.requires_grad else None for t in inputs)


def recomputable(bn, lif):
    """Whether :func:`norm_fire` can run ``bn`` and the fused neuron ``lif`` now: in training with a graph,
    batch statistics, and no hooks on either module (they would see tensors without a graph)."""
    return (torch.is_grad_enabled() and bn.training and bn.track_running_stats and bn.running_mean is not None
            and lif.recomputable and not _hooked(bn) and not _hooked(lif))


def _hooked(module):
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def norm_fire(bn, lif, y, to_sequence):
    """``lif(to_sequence(bn(y)))`` keeping only ``y`` (which BatchNorm's backward needs anyway) for the
    backward pass, instead of also the neuron's membranes (one float per element).

    The forward calls the modules without a graph (BatchNorm updates its running statistics once, the
    neuron its membrane); the backward recomputes BatchNorm and neuron with the same operations, so every
    number, the gradient through a membrane carried into the next call included, equals the
    module-by-module computation. ``lif`` is a :class:`sglformer.neuron.FusedLIFNode`.
    """
    membrane = lif.v if isinstance(lif.v, torch.Tensor) else None
    spikes, lif.v = _NormFire.apply((bn, lif, to_sequence), y, membrane, bn.weight, bn.bias)
    return spikes


class _MaxPoolKeepingIndices(torch.autograd.Function):
    """A 2D max pool whose backward pass keeps only the indices, as int32 (exact: they count elements of
    one input plane). The pool's backward reads its input's shape and strides, never its values, so
    ``like``, a tensor of the same shape and strides that is kept anyway, stands in for the input."""

    @staticmethod
    def forward(ctx, x, like, options):
        out, indices = torch.ops.aten.max_pool2d_with_indices(x, *options)
        ctx.save_for_backward(indices.int(), like)
        ctx.options = options
        return out

    @staticmethod
    def backward(ctx, grad):
        indices, like = ctx.saved_tensors
        kernel_size, stride, padding, dilation, ceil_mode = ctx.options
        return (torch.ops.aten.max_pool2d_with_indices_backward(grad, like, kernel_size, stride, padding, dilation,
                                                                 ceil_mode, indices.long()), None, None)


def max_pool(pool, x, like):
    """``pool(x)`` for a ``MaxPool2d``, keeping for the backward pass only int32 indices and ``like`` (see
    :class:`_MaxPoolKeepingIndices`) where that holds; the module itself otherwise."""
    if not (torch.is_grad_enabled() and x.requires_grad and type(pool) is nn.MaxPool2d and not pool.return_indices
            and not _hooked(pool) and like.shape == x.shape and like.stride() == x.stride()
            and x.shape[-2] * x.shape[-1] < 2 ** 31):
        return pool(x)
    pair = nn.modules.utils._pair
    options = (pair(pool.kernel_size), pair(pool.stride if pool.stride is not None else pool.kernel_size),
               pair(pool.padding), pair(pool.dilation), pool.ceil_mode)
    return _MaxPoolKeepingIndices.apply(x, like, options)


class _SpikeStore:
    """The live outputs of fused neurons, and boolean copies of those that are saved, for the
    saved-tensor hooks."""

    def __init__(self):
        self._spikes = {}

    def add(self, spikes):
        if spikes.numel() and spikes.is_contiguous() and spikes.storage_offset() == 0:
            self._spikes[spikes.untyped_storage().data_ptr()] = [weakref.ref(spikes), spikes._version, None]

    def pack(self, tensor):
        entry = self._spikes.get(tensor.untyped_storage().data_ptr()) if tensor.numel() else None
        if entry is not None:
            ref, version, fired = entry
            spikes = ref()
            # A live spike tensor owns the storage at that address; a view of it with the same dtype and
            # an unchanged version counter still holds spikes, at the same element offsets as the mask.
            if spikes is not None and tensor.dtype == spikes.dtype and tensor._version == version:
                if fired is None:
                    fired = entry[2] = torch.empty_like(spikes, dtype=torch.bool).copy_(spikes)
                return fired.as_strided(tensor.shape, tensor.stride(), tensor.storage_offset()), tensor.dtype
        return tensor.detach()

    @staticmethod
    def unpack(packed):
        if isinstance(packed, tuple):
            fired, dtype = packed
            return fired.view(torch.uint8).to(dtype)  # from bytes: several times faster than from booleans
        return packed


_active = threading.local()


def _register_spikes(spikes):
    store = getattr(_active, 'store', None)
    if store is not None:
        store.add(spikes)


@contextlib.contextmanager
def compact_spike_saving():
    """Within this context, tensors saved for the backward pass that hold a fused neuron's spikes are
    kept as booleans (1 byte per element instead of 4). Gradients are unchanged: spikes are 0 or 1."""
    outer = getattr(_active, 'store', None)
    store = _SpikeStore()
    _active.store = store
    try:
        with torch.autograd.graph.saved_tensors_hooks(store.pack, store.unpack):
            yield
    finally:
        _active.store = outer
