"""The one place where spiking neurons are created and their implementation and backend are chosen.

Every neuron of every SGLFormer variant is a multi-step LIF with the parameters of SPEC.md section 1,
in one of two implementations (:data:`NEURON_IMPLEMENTATIONS`) that compute identical numbers:

* ``spikingjelly``: spikingjelly 0.0.0.0.14's ``LIFNode``. Neurons are built with the ``torch``
  backend, which runs anywhere; the backend actually used is resolved when a model first sees an input
  on a device (see :func:`set_neuron_backend`), so a model moved to CUDA picks up CuPy kernels without
  any call by the user.
* ``fused``: :class:`sglformer.fused.FusedLIFNode`, a subclass of that ``LIFNode`` that computes the
  whole time loop in one autograd function and keeps less for the backward pass. It ignores the backend.

:func:`use_neuron_implementation` switches the neurons of a built model in place.
"""
import functools
import logging
import warnings

import torch
from torch import nn

with warnings.catch_warnings():
    # spikingjelly decorates its kernels with torch.jit.script, which current torch deprecates loudly.
    warnings.simplefilter('ignore', FutureWarning)
    from spikingjelly.activation_based import functional, surrogate
    from spikingjelly.activation_based import neuron as sj_neuron

from .fused import FusedLIFNode, check_fusable

_logger = logging.getLogger(__name__)

NEURON_BACKENDS = ('auto', 'torch', 'cupy')
NEURON_IMPLEMENTATIONS = ('spikingjelly', 'fused')
NEURON_CHOICES = ('auto',) + NEURON_IMPLEMENTATIONS  # what the training options accept
_NEURON_CLASSES = {'spikingjelly': sj_neuron.LIFNode, 'fused': FusedLIFNode}

TAU = 2.0
V_RESET = 0.0
SURROGATE_ALPHA = 4.0


class NeuronBackendError(RuntimeError):
    """The requested neuron backend cannot run here."""


def create_lif(v_threshold: float = 1.0, implementation: str = 'spikingjelly') -> nn.Module:
    """A multi-step LIF neuron (input ``[T, ...]``, time first) as the authors configure it."""
    return _neuron_class(implementation)(
        tau=TAU, decay_input=True, v_threshold=v_threshold, v_reset=V_RESET,
        surrogate_function=surrogate.Sigmoid(alpha=SURROGATE_ALPHA), detach_reset=True,
        step_mode='m', backend='torch')


def _neuron_class(implementation):
    if implementation not in NEURON_IMPLEMENTATIONS:
        raise ValueError(f"neuron implementation must be one of {', '.join(NEURON_IMPLEMENTATIONS)}, "
                         f'got {implementation!r}')
    return _NEURON_CLASSES[implementation]


def use_neuron_implementation(model: nn.Module, implementation: str) -> int:
    """Switch every LIF neuron of ``model`` to ``implementation`` in place; returns how many there are.

    Neurons hold no parameters or buffers and the fused class adds no state, so each neuron keeps its
    identity (module names, registered hooks, state dict); only its class changes, and its membrane is
    reset. Raises ``ValueError``, changing nothing, if a neuron is configured in a way the fused
    implementation does not compute.
    """
    cls = _neuron_class(implementation)
    neurons = [module for module in model.modules() if is_lif(module)]
    if cls is FusedLIFNode:
        for module in neurons:
            check_fusable(module)
    for module in neurons:
        module.__class__ = cls
        module.reset()
    return len(neurons)


def neuron_implementation(model: nn.Module):
    """``'spikingjelly'`` or ``'fused'`` if all LIF neurons of ``model`` use it, ``'mixed'`` otherwise,
    ``None`` without neurons."""
    found = {'fused' if isinstance(module, FusedLIFNode) else 'spikingjelly'
             for module in model.modules() if is_lif(module)}
    if not found:
        return None
    return found.pop() if len(found) == 1 else 'mixed'


def reset_neurons(model: nn.Module) -> None:
    """Return every neuron of ``model`` to its resting state (spikingjelly's ``reset_net``)."""
    functional.reset_net(model)


def is_lif(module: nn.Module) -> bool:
    return isinstance(module, sj_neuron.LIFNode)


@functools.lru_cache(maxsize=None)
def cupy_status():
    """``(usable, reason)``: whether spikingjelly's CuPy kernels can run in this process."""
    if not torch.cuda.is_available():
        return False, 'CUDA is not available'
    try:
        import cupy
        cupy.zeros(1).sum().item()
    except Exception as exc:  # any failure here means the kernels cannot run
        return False, f'cupy not importable: {type(exc).__name__}: {exc}'
    if sj_neuron.cupy is None:
        # spikingjelly swallows the import error of its own CuPy helpers (a missing tensorboard
        # makes it claim CuPy is absent); import them again to report the real reason.
        try:
            from spikingjelly.activation_based import cuda_utils, neuron_kernel  # noqa: F401
            reason = 'spikingjelly could not load its CuPy kernels'
        except Exception as exc:
            reason = f'spikingjelly could not load its CuPy kernels: {type(exc).__name__}: {exc}'
        return False, reason
    return True, f'cupy {cupy.__version__} works'


def resolve_backend(requested: str, device: torch.device):
    """``(backend, reason)`` for ``requested`` in :data:`NEURON_BACKENDS` on ``device``."""
    if requested not in NEURON_BACKENDS:
        raise ValueError(f"neuron backend must be one of {', '.join(NEURON_BACKENDS)}, got {requested!r}")
    device = torch.device(device)
    if requested == 'torch':
        return 'torch', 'requested'
    if device.type != 'cuda':
        if requested == 'cupy':
            raise NeuronBackendError(
                f"neuron backend 'cupy' needs the model on a CUDA device, but it runs on {device.type}; "
                "use backend 'auto' or 'torch'")
        return 'torch', f'model runs on {device.type}'
    usable, reason = cupy_status()
    if requested == 'cupy' and not usable:
        raise NeuronBackendError(
            f"neuron backend 'cupy' cannot run: {reason}. Install cupy-cuda12x or cupy-cuda13x "
            "matching your CUDA runtime, or use backend 'auto' or 'torch'")
    if usable:
        return 'cupy', reason
    return 'torch', reason


def resolve_implementation(requested: str, device) -> str:
    """The implementation for ``requested`` in :data:`NEURON_CHOICES` on ``device``. ``auto`` is the
    fastest exact one measured: spikingjelly's CuPy kernels where they run (CUDA), the fused neuron
    everywhere else (on the CPU it trains 1.08x faster with 0.67x the activation memory, README)."""
    if requested != 'auto':
        _neuron_class(requested)  # a clear error for an unknown name
        return requested
    if torch.device(device).type == 'cuda' and cupy_status()[0]:
        return 'spikingjelly'
    return 'fused'


def set_neuron_backend(model: nn.Module, requested: str, device: torch.device) -> str:
    """Resolve ``requested`` for ``device``, set it on every spikingjelly LIF of ``model`` (fused ones
    have no backend) and log the choice once."""
    backend, reason = resolve_backend(requested, device)
    for module in model.modules():
        if is_lif(module) and not isinstance(module, FusedLIFNode):
            module.backend = backend
    _log_choice(requested, backend, reason, torch.device(device).type, neuron_implementation(model))
    return backend


@functools.lru_cache(maxsize=None)
def _log_choice(requested, backend, reason, device_type, implementation):
    # Cached so that the line appears once per process and choice, not once per model or forward.
    if implementation == 'fused':
        _logger.info('LIF neurons: fused implementation on %s', device_type)
    else:
        _logger.info('LIF neurons: %sbackend %s on %s (asked for %s: %s)',
                     'fused and spikingjelly with ' if implementation == 'mixed' else '',
                     backend, device_type, requested, reason)
