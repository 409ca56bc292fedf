"""The neuron factory and the one decision of implementation and backend, on either spikingjelly stack."""
import argparse
import logging

import pytest
import timm
import torch
from spikingjelly.activation_based import neuron as sj_neuron

from sglformer import fused, neuron
from sglformer.neuron import (NEURON_BACKENDS, STACK, NeuronBackendError, NeuronChoice, choose_neuron, create_lif,
                              is_lif)

LEGACY = 'cupy' in NEURON_BACKENDS  # spikingjelly 0.0.0.0.14; spikingjelly 2 has no CuPy neurons


def concrete(choice):
    return choice.implementation, choice.backend


@pytest.fixture
def fresh_choices():
    """Forget the probes and log lines of earlier choices, before and after the test."""
    def clear():
        for cached in (neuron._probe, neuron._log_choice, neuron._log_fallback):
            cached.cache_clear()
    clear()
    yield
    clear()


def test_lif_parameters():
    lif = create_lif(0.5)
    assert isinstance(lif, sj_neuron.LIFNode)
    assert (lif.tau, lif.v_threshold, lif.v_reset, lif.decay_input, lif.detach_reset, lif.step_mode) == \
        (2.0, 0.5, 0.0, True, True, 'm')
    assert lif.surrogate_function.alpha == 4.0
    assert not list(lif.parameters()) and not list(lif.buffers()) and not lif.state_dict()


def test_lif_dynamics_by_hand():
    """H = V + (X - V) / 2; spike when H >= 1; hard reset to 0."""
    lif = create_lif()
    x = torch.tensor([[1.5], [1.5], [0.4], [2.0]])
    # H: 0.75 (no), 1.125 (spike, V=0), 0.2 (no), 1.1 (spike)
    assert lif(x).flatten().tolist() == [0.0, 1.0, 0.0, 1.0]


def test_stack_is_named():
    assert STACK.startswith('spikingjelly ') and STACK.split()[1][0] in '02'


def test_auto_on_cpu_is_the_fused_neuron(fresh_choices, caplog):
    with caplog.at_level(logging.INFO, logger='sglformer'):
        choice = choose_neuron('auto', 'auto', 'cpu')
        assert choose_neuron() == choice  # the defaults; logged once
    assert concrete(choice) == ('fused', None)
    assert 'fastest exact' in choice.reason and STACK in choice.reason
    assert caplog.text.count('LIF neurons on cpu: fused') == 1


def test_spikingjelly_on_cpu_runs_torch_code():
    assert concrete(choose_neuron('spikingjelly', 'auto', 'cpu')) == ('spikingjelly', 'torch')
    assert choose_neuron('spikingjelly', 'torch', torch.device('cpu')) == \
        NeuronChoice('spikingjelly', 'torch', 'requested')
    assert concrete(choose_neuron('fused', 'auto', 'cpu')) == ('fused', None)


def test_explicit_backend_with_fused_is_an_error():
    with pytest.raises(NeuronBackendError, match="fused neuron has no backend, but backend 'torch'"):
        choose_neuron('fused', 'torch', 'cpu')


def test_unknown_names_are_clear_errors():
    with pytest.raises(NeuronBackendError, match="implementation must be one of auto, spikingjelly, fused, got 'fast'"):
        choose_neuron('fast')
    with pytest.raises(NeuronBackendError, match=f"backend must be one of {', '.join(NEURON_BACKENDS)}"):
        choose_neuron('spikingjelly', 'opencl')
    assert issubclass(NeuronBackendError, ValueError)


@pytest.mark.skipif(not LEGACY, reason='spikingjelly 0.0.0.0.14 only')
def test_cupy_on_cpu_is_a_clear_error():
    with pytest.raises(NeuronBackendError, match="'cupy' needs the model on a CUDA device"):
        choose_neuron('spikingjelly', 'cupy', 'cpu')
    with pytest.raises(NeuronBackendError, match="'triton' is not offered by spikingjelly 0.0.0.0.14.*-sj2.txt"):
        choose_neuron('spikingjelly', 'triton', 'cpu')


@pytest.mark.skipif(not LEGACY or torch.cuda.is_available(), reason='spikingjelly 0.0.0.0.14 without CUDA')
def test_cupy_on_cuda_without_a_gpu_says_why():
    with pytest.raises(NeuronBackendError, match='CUDA is not available'):
        choose_neuron('spikingjelly', 'cupy', 'cuda')


@pytest.mark.skipif(LEGACY, reason='spikingjelly 2 only')
def test_cupy_on_spikingjelly_2_names_the_stack_that_has_it():
    with pytest.raises(NeuronBackendError, match=r"'cupy' is not offered by spikingjelly 2\..*its backends: auto, "
                                                 r"torch, triton, cuda.*0\.0\.0\.0\.14 with cupy-cuda12x or "
                                                 r"cupy-cuda13x: pip install -r requirements\.txt"):
        choose_neuron('spikingjelly', 'cupy', 'cpu')
    with pytest.raises(NeuronBackendError, match="'triton' needs a CUDA device"):
        choose_neuron('spikingjelly', 'triton', 'cpu')


def _broken_lif(monkeypatch, how):
    real = fused.multi_step_lif

    def broken(x_seq, *args, **kwargs):
        if how == 'raises':
            raise RuntimeError('simulated kernel failure')
        spikes, v = real(x_seq, *args, **kwargs)
        return 1 - spikes, v
    monkeypatch.setattr(fused, 'multi_step_lif', broken)


@pytest.mark.parametrize('how, why', [('raises', 'RuntimeError: simulated kernel failure'),
                                      ('wrong', 'its spikes differ from a plain PyTorch LIF')])
def test_auto_falls_back_with_one_line_when_a_kernel_fails(monkeypatch, fresh_choices, caplog, how, why):
    _broken_lif(monkeypatch, how)
    probes = []
    real_spikes_and_gradient = neuron._spikes_and_gradient
    monkeypatch.setattr(neuron, '_spikes_and_gradient', lambda *a: probes.append(1) or real_spikes_and_gradient(*a))
    with caplog.at_level(logging.INFO, logger='sglformer'):
        first = choose_neuron('auto', 'auto', 'cpu')
        probed = len(probes)
        again = choose_neuron('auto', 'auto', 'cpu')
    assert first == again and concrete(first) == ('spikingjelly', 'torch')
    assert f'skipped fused: {why}' in first.reason
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f'LIF neurons: fused cannot run on cpu ({why}); using spikingjelly (torch)']
    assert probed >= 3 and len(probes) == probed  # the outcome of each probe is kept for the process
    with pytest.raises(NeuronBackendError, match=f'no requested neuron can run on cpu \\(fused: {why}\\)'):
        choose_neuron('fused', 'auto', 'cpu')  # asked for explicitly: an error, not a fallback


def test_model_settles_its_neurons_at_the_first_forward():
    model = timm.create_model('sglformer_cifar10', embed_dims=48, num_heads=4, T=1, neuron='auto').eval()
    assert model.neuron == 'spikingjelly'  # nothing decided before the device is known
    with torch.no_grad():
        model(torch.rand(1, 3, 32, 32))
    assert model.neuron == 'fused'
    model.set_neuron('spikingjelly')
    with torch.no_grad():
        model(torch.rand(1, 3, 32, 32))
    assert model.neuron == 'spikingjelly'
    if LEGACY:
        assert {m.backend for m in model.modules() if is_lif(m)} == {'torch'}
    with pytest.raises(NeuronBackendError):
        model.set_neuron_backend('fast')


def test_model_backend_errors():
    if LEGACY:
        model = timm.create_model('sglformer_cifar10', embed_dims=48, num_heads=4, T=1, neuron_backend='cupy').eval()
        with pytest.raises(NeuronBackendError, match='needs the model on a CUDA device'):
            model(torch.rand(1, 3, 32, 32))
    else:
        with pytest.raises(NeuronBackendError, match="'cupy' is not offered"):
            timm.create_model('sglformer_cifar10', embed_dims=48, num_heads=4, T=1, neuron_backend='cupy')
    model = timm.create_model('sglformer_cifar10', embed_dims=48, num_heads=4, T=1, neuron='fused',
                              neuron_backend='torch').eval()
    with pytest.raises(NeuronBackendError, match='fused neuron has no backend'):
        model(torch.rand(1, 3, 32, 32))


def test_concrete_choices_build_without_a_decision(monkeypatch):
    """What the training code does: one choose_neuron, then a model built with its result."""
    from sglformer.build import create_model
    choice = choose_neuron('auto', 'auto', 'cpu')
    args = argparse.Namespace(model='sglformer_cifar10', dim=48, num_heads=4, time_step=1, device='cpu',
                              neuron=choice.implementation, neuron_backend=choice.backend)
    model = create_model(args)
    assert model.neuron == 'fused'
    asked = []
    real = neuron.choose_neuron
    monkeypatch.setattr('sglformer.models.choose_neuron', lambda *a: asked.append(a) or real(*a))
    with torch.no_grad():
        model.eval()(torch.rand(1, 3, 32, 32))
    assert asked == [('fused', 'auto', torch.device('cpu'))] and model.neuron == 'fused'


def test_create_model_leaves_auto_to_the_first_forward():
    from sglformer.build import create_model
    args = argparse.Namespace(model='sglformer_cifar10', dim=48, num_heads=4, time_step=1, neuron='auto',
                              neuron_backend='auto')
    model = create_model(args)
    assert model.neuron == 'spikingjelly'  # the authors' neurons until a device is known
    with torch.no_grad():
        model.eval()(torch.rand(1, 3, 32, 32))
    assert model.neuron == 'fused'  # auto's choice on the CPU
