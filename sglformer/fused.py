"""A fused multi-step LIF neuron: spikingjelly's ``LIFNode`` as SGLFormer configures it, bit for bit,
computed by one autograd function per layer.

spikingjelly's ``torch`` backend builds about a dozen autograd nodes per time step and keeps two
float tensors per element for the backward pass (the surrogate's input and ``1 - spike``), plus the
float spikes it stacks into its output. :class:`FusedLIFNode` runs the same recurrence with the same
floating-point operations in the same order, so spikes, membranes and gradients are identical, but it
keeps one float per element (``H[t] - v_threshold``, from which the spikes follow) and builds one
autograd node per layer.

Spikes are exactly 0 or 1, so a layer that consumes them and saves its input for the backward pass
(a convolution, a matrix product) need not keep them as floats: inside :func:`compact_spike_saving`,
saved tensors that view a fused neuron's output are kept as that neuron's boolean spike mask and turned
back into floats when the backward pass needs them. The models enter that context themselves when
they hold fused neurons.
"""
import contextlib
import threading
import weakref

import torch
from spikingjelly.activation_based import neuron as sj_neuron
from spikingjelly.activation_based import surrogate


class _MultiStepLIF(torch.autograd.Function):
    """Hard-reset LIF over ``x_seq[0], x_seq[1], ...`` with spikingjelly's arithmetic:

    charge ``H = V + (X - V) / tau``; fire ``S = (H - v_threshold >= 0)``; reset ``V = H`` where
    ``S == 0`` and ``0`` where ``S == 1``, the reset detached from the graph; surrogate gradient
    ``dS/dH = (1 - sigmoid(alpha z)) sigmoid(alpha z) alpha`` at ``z = H - v_threshold``.

    Returns the spikes (dtype of ``x_seq``), the final membrane and the boolean spike mask.
    """

    @staticmethod
    def forward(ctx, x_seq, v, v_threshold, tau, alpha):
        # Buffers are allocated once and written in place: fresh memory costs page faults on the CPU.
        z_seq = torch.empty_like(x_seq)
        fired = torch.empty_like(x_seq, dtype=torch.bool)
        for t in range(x_seq.shape[0]):
            z = z_seq[t]  # holds (X - V) / tau until it takes H - v_threshold
            torch.sub(x_seq[t], v, out=z).div_(tau)
            v = v + z if t == 0 else v.add_(z)  # the caller's v is never written to
            torch.sub(v, v_threshold, out=z)
            torch.ge(z, 0., out=fired[t])
            v.masked_fill_(fired[t], 0.)
        ctx.save_for_backward(z_seq)
        ctx.tau = tau
        ctx.alpha = alpha
        ctx.mark_non_differentiable(fired)
        ctx.set_materialize_grads(False)
        return fired.to(x_seq.dtype), v, fired

    @staticmethod
    def backward(ctx, grad_spikes, grad_v, _):
        z_seq, = ctx.saved_tensors
        tau, alpha = ctx.tau, ctx.alpha
        # The surrogate, as spikingjelly's sigmoid_backward: grad * (1 - sg) * sg * alpha, left to right.
        # The sigmoid goes step by step: on the CPU its result depends, in the last bit, on where an
        # element falls in the vectorised loop, and spikingjelly computes it on one time step at a time.
        sg = torch.mul(z_seq, alpha)
        for t in range(z_seq.shape[0]):
            sg[t].sigmoid_()
        if grad_spikes is None:
            grad_h = torch.zeros_like(sg)
        else:
            grad_h = torch.rsub(sg, 1.).mul_(grad_spikes).mul_(sg).mul_(alpha)
        grad_x = sg  # the sigmoid is not needed any more: its memory takes the input's gradient
        silent = torch.empty_like(z_seq[0], dtype=torch.bool)
        carried = torch.empty_like(z_seq[0])
        for t in reversed(range(z_seq.shape[0])):
            dh = grad_h[t]
            if grad_v is not None:
                # Through the detached reset V = H * (1 - S): the membrane's gradient where no spike fired.
                torch.lt(z_seq[t], 0., out=silent)
                dh.add_(torch.mul(grad_v, silent, out=carried))
            torch.div(dh, tau, out=grad_x[t])
            # V[t-1] enters H = V + (X - V) / tau twice: dV = dH - dH / tau.
            grad_v = torch.sub(dh, grad_x[t], out=carried) if t > 0 or ctx.needs_input_grad[1] else None
        return grad_x, grad_v, None, None, None


def _lif_inference(x_seq, v, v_threshold, tau):
    """:class:`_MultiStepLIF`'s forward without a graph (spikingjelly's eval kernel computes the same)."""
    fired = torch.empty_like(x_seq, dtype=torch.bool)
    step = torch.empty_like(v)
    for t in range(x_seq.shape[0]):
        torch.sub(x_seq[t], v, out=step).div_(tau)
        v = v + step if t == 0 else v.add_(step)
        torch.ge(v, v_threshold, out=fired[t])
        v.masked_fill_(fired[t], 0.)
    return fired.to(x_seq.dtype), v, fired


class FusedLIFNode(sj_neuron.LIFNode):
    """spikingjelly's ``LIFNode`` whose multi-step forward is :class:`_MultiStepLIF`.

    Only the configuration of SPEC.md section 1 is supported (hard reset to 0, ``decay_input``,
    ``detach_reset``, sigmoid surrogate; any tau, threshold and alpha): see :func:`check_fusable`.
    It has no parameters, buffers or state of its own, so ``reset_net``, state dicts and hooks work as
    for the ``LIFNode`` it replaces. Single-step mode and ``store_v_seq`` use spikingjelly's code; the
    ``backend`` attribute is not used.
    """

    def multi_step_forward(self, x_seq):
        if self.store_v_seq:
            return super().multi_step_forward(x_seq)
        self.v_float_to_tensor(x_seq[0])
        alpha = self.surrogate_function.alpha
        if torch.is_grad_enabled() and (x_seq.requires_grad or self.v.requires_grad):
            spikes, self.v, fired = _MultiStepLIF.apply(x_seq, self.v, self.v_threshold, self.tau, alpha)
            _register_spikes(spikes, fired)
        else:
            spikes, self.v, _ = _lif_inference(x_seq, self.v, self.v_threshold, self.tau)
        return spikes


def check_fusable(lif):
    """Raise ``ValueError`` unless :class:`FusedLIFNode` computes exactly what ``lif`` computes."""
    problems = []
    if not lif.decay_input:
        problems.append('decay_input=False')
    if lif.v_reset != 0.:
        problems.append(f'v_reset={lif.v_reset}')
    if not lif.detach_reset:
        problems.append('detach_reset=False')
    if type(lif.surrogate_function) is not surrogate.Sigmoid or not lif.surrogate_function.spiking:
        problems.append(f'surrogate {lif.surrogate_function!r}')
    if problems:
        raise ValueError('the fused LIF implements hard reset to 0 with decay_input, detach_reset and the '
                         f"sigmoid surrogate; this neuron has {', '.join(problems)}")


class _SpikeStore:
    """The live outputs of fused neurons and their masks, for the saved-tensor hooks."""

    def __init__(self):
        self._spikes = {}

    def add(self, spikes, fired):
        if spikes.numel() and spikes.stride() == fired.stride() and spikes.storage_offset() == 0:
            self._spikes[spikes.untyped_storage().data_ptr()] = (weakref.ref(spikes), spikes._version, fired)

    def pack(self, tensor):
        entry = self._spikes.get(tensor.untyped_storage().data_ptr()) if tensor.numel() else None
        if entry is not None:
            ref, version, fired = entry
            spikes = ref()
            # A live spike tensor owns the storage at that address; a view of it with the same dtype and
            # an unchanged version counter still holds spikes, at the same element offsets as the mask.
            if spikes is not None and tensor.dtype == spikes.dtype and tensor._version == version:
                return fired.as_strided(tensor.shape, tensor.stride(), tensor.storage_offset()), tensor.dtype
        return tensor.detach()

    @staticmethod
    def unpack(packed):
        if isinstance(packed, tuple):
            fired, dtype = packed
            return fired.to(dtype)
        return packed


_active = threading.local()


def _register_spikes(spikes, fired):
    store = getattr(_active, 'store', None)
    if store is not None:
        store.add(spikes, fired)


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
