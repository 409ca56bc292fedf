"""The arithmetic of the fused multi-step LIF neuron (:class:`sglformer.neuron.FusedLIFNode`), free of
any spikingjelly version: spikingjelly's ``LIFNode`` as SGLFormer configures it, bit for bit, in one
autograd function per layer.

spikingjelly's Torch neurons build about a dozen autograd nodes per time step and keep two float
tensors per element for the backward pass (the surrogate's input and ``1 - spike``), plus the float
spikes stacked into the output. :class:`_MultiStepLIF` runs the same recurrence with the same
floating-point operations in the same order, so spikes, membranes and gradients are identical
(``torch.equal``), but keeps one float per element (``H[t] - v_threshold``, from which the spikes follow).
:func:`lif_input_gradient` differentiates it again from its input alone, for units that recompute
(:mod:`sglformer.memory`).
"""
import torch


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
    graph only where a gradient is needed."""
    if torch.is_grad_enabled() and (x_seq.requires_grad or v.requires_grad):
        return _MultiStepLIF.apply(x_seq, v, v_threshold, tau, alpha, scaled_surrogate)
    return _lif_inference(x_seq, v, v_threshold, tau)
