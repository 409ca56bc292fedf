"""Spiking neurons: which spikingjelly is installed, the LIF factory, and the one place where a neuron
implementation and backend are chosen (:func:`choose_neuron`).

Every neuron of every SGLFormer variant is a multi-step LIF (tau 2, hard reset to 0, detached reset,
sigmoid surrogate with alpha 4; threshold 1, 0.5 in attention) in one of two implementations
(:data:`NEURON_IMPLEMENTATIONS`):

* ``spikingjelly``: the installed spikingjelly's ``LIFNode``, the authors' computation.
* ``fused``: :class:`FusedLIFNode`, a subclass of that ``LIFNode`` that runs the time loop in one
  autograd function (:mod:`sglformer.fused`) with the same floating-point operations, bit for bit.

Two spikingjelly stacks are supported, and this module is the only one that knows which is installed:

* spikingjelly 0.0.0.0.14 (the authors'): each neuron has a ``backend``, ``torch`` (anywhere) or
  ``cupy`` (CUDA, with CuPy installed).
* spikingjelly 2.x: neurons have no backend. On the CPU they run Torch code; on CUDA spikingjelly picks
  native CUDA, Triton or Torch kernels once per process, which the environment variable
  ``SJ_LIF_CUDA_IMPLEMENTATION`` (``auto``, ``cuda``, ``triton`` or ``torch``), set before Python starts,
  can force. A backend named here is checked against that choice, never set.
"""
import dataclasses
import functools
import importlib.metadata
import logging
import warnings

import torch
from torch import nn

with warnings.catch_warnings():
    # spikingjelly 0.0.0.0.14 decorates its kernels with torch.jit.script, which current torch deprecates loudly.
    warnings.simplefilter('ignore', FutureWarning)
    from spikingjelly.activation_based import functional, surrogate
    from spikingjelly.activation_based import neuron as sj_neuron

from . import fused

_logger = logging.getLogger(__name__)

SPIKINGJELLY_VERSION = importlib.metadata.version('spikingjelly')
STACK = f'spikingjelly {SPIKINGJELLY_VERSION}'
_LEGACY = SPIKINGJELLY_VERSION.startswith('0.')
if not _LEGACY and SPIKINGJELLY_VERSION.split('.')[0] != '2':
    raise ImportError(f'{STACK} is not supported: install spikingjelly 0.0.0.0.14 (pip install -r requirements.txt) '
                      'or spikingjelly 2.x (pip install -r requirements-sj2.txt)')

NEURON_IMPLEMENTATIONS = ('spikingjelly', 'fused')
NEURON_CHOICES = ('auto',) + NEURON_IMPLEMENTATIONS  # what the training options accept
# Backends of spikingjelly neurons: those of the installed stack, and every name either stack knows.
NEURON_BACKENDS = ('auto', 'torch', 'cupy') if _LEGACY else ('auto', 'torch', 'triton', 'cuda')
KNOWN_BACKENDS = ('auto', 'torch', 'cupy', 'triton', 'cuda')

TAU = 2.0
V_RESET = 0.0
SURROGATE_ALPHA = 4.0

if _LEGACY:
    _LIF_OPTIONS = {'backend': 'torch'}
    # spikingjelly multiplies the incoming gradient by the surrogate's factors left to right.
    _SCALED_SURROGATE_DTYPES = frozenset()

    def _initial_membrane(lif, v, x_seq):
        return torch.full_like(x_seq[0], v) if isinstance(v, float) else v

    def _stock_only(lif):
        return lif.store_v_seq

    def _computing_dtype(x_seq):
        # Its Torch neurons charge in TorchScript functions, which CPU autocast runs in float32.
        lower = x_seq.dtype in (torch.float16, torch.bfloat16)
        return torch.float32 if lower and x_seq.device.type == 'cpu' and torch.is_autocast_enabled('cpu') else x_seq.dtype
else:
    _LIF_OPTIONS = {}
    # On float32 its Torch kernel multiplies the gradient by the finished derivative (1 - s) * s * alpha.
    _SCALED_SURROGATE_DTYPES = frozenset({torch.float32})

    def _initial_membrane(lif, v, x_seq):
        return lif.materialize_states((x_seq,), (v,), 'm')[0]

    def _stock_only(lif):
        return lif.store_v_seq or lif._neuron_precision is not None

    def _computing_dtype(x_seq):
        return x_seq.dtype


def spikingjelly_memopt():
    """spikingjelly 2's ``memopt`` (activation checkpointing and spike compression), ``None`` with 0.0.0.0.14."""
    if _LEGACY:
        return None
    from spikingjelly.activation_based import memopt
    return memopt


class NeuronBackendError(ValueError):
    """A neuron implementation or backend that does not exist, or cannot run here."""


class FusedLIFNode(sj_neuron.LIFNode):
    """The installed spikingjelly's ``LIFNode`` whose multi-step forward is :func:`sglformer.fused.multi_step_lif`.

    Only the configuration SGLFormer uses is supported (see :func:`check_fusable`). It has no parameters,
    buffers or state of its own, so ``reset_net``, state dicts and hooks work as for the ``LIFNode`` it
    replaces. Single-step mode, ``store_v_seq`` and spikingjelly 2's reduced-precision neurons run
    spikingjelly's code.
    """

    def multi_step_forward(self, x_seq):
        if _stock_only(self):
            return super().multi_step_forward(x_seq)
        x_seq = x_seq.to(_computing_dtype(x_seq))  # under autocast, what spikingjelly's own neuron computes in
        spikes, self.v = fused.multi_step_lif(x_seq, initial_membrane(self, self.v, x_seq), *self._parameters_for(x_seq))
        return spikes

    def _parameters_for(self, x_seq):
        return (self.v_threshold, self.tau, self.surrogate_function.alpha,
                x_seq.dtype in _SCALED_SURROGATE_DTYPES)

    def input_gradient(self, x_seq, v, grad_spikes, grad_v, initial_v_grad):
        """Gradients of ``x_seq`` and (with ``initial_v_grad``) of ``v`` of a multi-step forward from
        membrane ``v``, recomputed in ``x_seq``'s memory (see :func:`sglformer.fused.lif_input_gradient`)."""
        dtype = x_seq.dtype
        x_seq = x_seq.to(_computing_dtype(x_seq))
        grad_x, grad_v = fused.lif_input_gradient(x_seq, v.to(x_seq.dtype), *self._parameters_for(x_seq),
                                                  grad_spikes, grad_v, initial_v_grad)
        return grad_x.to(dtype), grad_v


def initial_membrane(lif, v, x_seq):
    """The membrane tensor a multi-step forward of ``lif`` on ``x_seq`` starts from when its state is ``v``."""
    return _initial_membrane(lif, v, x_seq.to(_computing_dtype(x_seq)) if isinstance(lif, FusedLIFNode) else x_seq)


def recomputable_neuron(lif) -> bool:
    """Whether ``lif`` runs a multi-step forward that a unit can run again from a given membrane with the same
    numbers (not where it records its membranes, nor spikingjelly 2's reduced-precision neurons)."""
    return lif.step_mode == 'm' and not _stock_only(lif)


_NEURON_CLASSES = {'spikingjelly': sj_neuron.LIFNode, 'fused': FusedLIFNode}


def create_lif(v_threshold: float = 1.0, implementation: str = 'spikingjelly') -> nn.Module:
    """A multi-step LIF neuron (input ``[T, ...]``, time first) as the authors configure it."""
    return _neuron_class(implementation)(
        tau=TAU, decay_input=True, v_threshold=v_threshold, v_reset=V_RESET,
        surrogate_function=surrogate.Sigmoid(alpha=SURROGATE_ALPHA), detach_reset=True, step_mode='m',
        **_LIF_OPTIONS)


def _neuron_class(implementation):
    if implementation not in NEURON_IMPLEMENTATIONS:
        raise NeuronBackendError(f"neuron implementation must be one of {', '.join(NEURON_IMPLEMENTATIONS)}, "
                                 f'got {implementation!r}')
    return _NEURON_CLASSES[implementation]


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


def apply_neuron_backend(model: nn.Module, backend) -> None:
    """Give the spikingjelly neurons of ``model`` a backend :func:`choose_neuron` returned (spikingjelly
    0.0.0.0.14; spikingjelly 2's neurons have none, and ``None`` changes nothing)."""
    if _LEGACY and backend is not None:
        for module in model.modules():
            if is_lif(module) and not isinstance(module, FusedLIFNode):
                module.backend = backend


@dataclasses.dataclass(frozen=True)
class NeuronChoice:
    """What :func:`choose_neuron` decided: ``implementation`` (``spikingjelly`` or ``fused``), the
    spikingjelly ``backend`` it runs (``None`` for ``fused``) and why."""
    implementation: str
    backend: object
    reason: str


def check_neuron_request(implementation='auto', backend='auto') -> None:
    """Raise :class:`NeuronBackendError` for names or combinations :func:`choose_neuron` never accepts."""
    if implementation not in NEURON_CHOICES:
        raise NeuronBackendError(f"neuron implementation must be one of {', '.join(NEURON_CHOICES)}, "
                                 f'got {implementation!r}')
    if backend not in KNOWN_BACKENDS:
        raise NeuronBackendError(f"neuron backend must be one of {', '.join(NEURON_BACKENDS)} with {STACK}, "
                                 f'got {backend!r}')
    if implementation == 'fused' and backend != 'auto':
        raise NeuronBackendError(f"the fused neuron has no backend, but backend {backend!r} was asked for: use "
                                 "backend 'auto' with it, or implementation 'spikingjelly' for that backend")
    if backend not in NEURON_BACKENDS:
        provider = ('spikingjelly 0.0.0.0.14 with cupy-cuda12x or cupy-cuda13x: pip install -r requirements.txt'
                    if backend == 'cupy' else 'spikingjelly 2.x: pip install -r requirements-sj2.txt')
        raise NeuronBackendError(f"neuron backend {backend!r} is not offered by {STACK} (its backends: "
                                 f"{', '.join(NEURON_BACKENDS)}); it comes with {provider}")


def choose_neuron(implementation='auto', backend='auto', device='cpu') -> NeuronChoice:
    """The neuron implementation and backend to run on ``device``: the only place this is decided.

    ``auto`` takes the fastest exact candidate, as measured with ``python -m sglformer.bench``: on the
    CPU the fused neuron (CIFAR-10 4-384, batch 16: 1.05x the train-step speed of spikingjelly
    0.0.0.0.14's Torch neurons and 1.03x that of spikingjelly 2's, with 0.4x the activation memory);
    on CUDA, not measured yet, spikingjelly's own one-kernel neurons (CuPy with 0.0.0.0.14, CUDA or
    Triton with 2.x) before the fused neuron, which launches several small kernels per time step.
    Every candidate first runs a tiny forward and backward on ``device`` against a plain PyTorch LIF
    (spikes equal, gradients close), once per process; one that fails is skipped with one logged line.
    An explicit request that cannot run raises :class:`NeuronBackendError` saying why.
    """
    check_neuron_request(implementation, backend)
    device = torch.device(device)
    candidates = _candidates(implementation, backend, device)
    failures = []
    for index, (name, concrete) in enumerate(candidates):
        problem = _probe(name, concrete, str(device))
        if problem is None:
            reason = _reason(implementation, backend, device, failures)
            choice = NeuronChoice(name, concrete, reason)
            _log_choice(choice, device.type)
            return choice
        failures.append(f'{_label(name, concrete)}: {problem}')
        if index + 1 < len(candidates):
            _log_fallback(_label(name, concrete), problem, _label(*candidates[index + 1]), device.type)
    raise NeuronBackendError(f"no requested neuron can run on {device} ({'; '.join(failures)})")


def _candidates(implementation, backend, device):
    """``(implementation, backend)`` pairs that satisfy the request, fastest first."""
    if implementation == 'fused':
        return [('fused', None)]
    if backend != 'auto':
        return [('spikingjelly', _checked_backend(backend, device))]
    stock = [('spikingjelly', _stock_backend(device))]
    if _LEGACY and device.type == 'cuda':
        stock.insert(0, ('spikingjelly', 'cupy'))
    if implementation == 'spikingjelly':
        return stock
    if device.type == 'cuda':
        return stock[:1] + [('fused', None)] + stock[1:]
    return [('fused', None)] + stock


def _stock_backend(device):
    """The backend spikingjelly's own neurons run on ``device`` when nothing is forced."""
    if _LEGACY or device.type != 'cuda':
        return 'torch'
    try:
        return functional.neuron_implementation('lif', device)['implementation']
    except RuntimeError:
        return 'auto'  # none found: the probe runs spikingjelly's own choice and reports why it fails


def _checked_backend(backend, device):
    if _LEGACY:
        if backend == 'cupy' and device.type != 'cuda':
            raise NeuronBackendError(f"neuron backend 'cupy' needs the model on a CUDA device, but it runs on "
                                     f"{device.type}; use backend 'auto' or 'torch'")
        return backend
    if device.type != 'cuda' and backend != 'torch':
        raise NeuronBackendError(f"neuron backend {backend!r} needs a CUDA device; with {STACK} neurons on "
                                 f"{device.type} run Torch code (backend 'auto' or 'torch')")
    running = _stock_backend(device)
    if running != backend:
        raise NeuronBackendError(
            f'{STACK} picks its CUDA neuron kernels once per process and runs {running!r} here, not '
            f'{backend!r}: start Python with SJ_LIF_CUDA_IMPLEMENTATION={backend} in the environment, or use '
            "backend 'auto'")
    return backend


def _label(implementation, backend):
    return implementation if backend is None else f'{implementation} ({backend})'


def _reason(implementation, backend, device, failures):
    if backend != 'auto' or implementation == 'fused':
        reason = 'requested'
    elif implementation == 'auto':
        reason = f'the fastest exact neuron on {device.type} with {STACK}'
    else:
        reason = f"{STACK}'s fastest backend on {device.type}"
    return reason + ''.join(f'; skipped {failure}' for failure in failures)


@functools.lru_cache(maxsize=None)
def _log_choice(choice, device_type):
    # Cached: one line per process and outcome, not one per model or forward.
    _logger.info('LIF neurons on %s: %s (%s)', device_type, _label(choice.implementation, choice.backend),
                 choice.reason)


@functools.lru_cache(maxsize=None)
def _log_fallback(failed, problem, fallback, device_type):
    _logger.warning('LIF neurons: %s cannot run on %s (%s); using %s', failed, device_type, problem, fallback)


@functools.lru_cache(maxsize=None)
def _probe(implementation, backend, device):
    """``None`` if this neuron computes a small LIF problem on ``device`` as :func:`_reference_lif`
    does (spikes equal, input gradients close), otherwise what went wrong. Once per process."""
    if backend == 'cupy':
        usable, reason = cupy_status()
        if not usable:
            return reason
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 3, 37, generator=generator) * 1.5 + 0.4).to(device)
    weights = torch.randn(x.shape, generator=generator).to(device)
    try:
        lif = create_lif(1.0, implementation)
        apply_neuron_backend(nn.Sequential(lif), backend)
        actual = _spikes_and_gradient(lif, x, weights)
    except Exception as exc:  # any failure of a kernel makes it unusable; the message says which
        return f'{type(exc).__name__}: {exc}'
    expected = _spikes_and_gradient(_reference_lif, x, weights)
    if not torch.equal(actual[0], expected[0]):
        return 'its spikes differ from a plain PyTorch LIF'
    if not torch.allclose(actual[1], expected[1], rtol=1e-4, atol=1e-6):
        return f'its gradients differ from a plain PyTorch LIF by up to {(actual[1] - expected[1]).abs().max():.2e}'
    return None


def _spikes_and_gradient(lif, x, weights):
    # Probes run wherever a model first sees an input: under no_grad, inference mode or autocast too.
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
        x = x.clone().requires_grad_()
        spikes = lif(x)
        (spikes * weights).sum().backward()
    return spikes.detach().cpu(), x.grad.cpu()


class _SigmoidSurrogateSpike(torch.autograd.Function):
    """Heaviside step forward, the derivative of ``sigmoid(alpha z)`` backward."""

    @staticmethod
    def forward(ctx, z):
        ctx.save_for_backward(z)
        return (z >= 0).to(z.dtype)

    @staticmethod
    def backward(ctx, grad):
        z, = ctx.saved_tensors
        s = torch.sigmoid(z * SURROGATE_ALPHA)
        return grad * (1 - s) * s * SURROGATE_ALPHA


def _reference_lif(x_seq, v_threshold=1.0):
    """The neurons' equations in plain PyTorch, for :func:`_probe`."""
    v = torch.zeros_like(x_seq[0])
    spikes = []
    for x in x_seq:
        h = v + (x - v) / TAU
        spike = _SigmoidSurrogateSpike.apply(h - v_threshold)
        v = h * (1 - spike.detach())
        spikes.append(spike)
    return torch.stack(spikes)


@functools.lru_cache(maxsize=None)
def cupy_status():
    """``(usable, reason)``: whether spikingjelly 0.0.0.0.14's CuPy kernels can run in this process."""
    if not _LEGACY:
        return False, f'{STACK} has no CuPy neurons'
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
