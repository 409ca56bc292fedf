"""The neuron factory and the backend choice."""
import logging

import pytest
import torch
from spikingjelly.activation_based import neuron as sj_neuron

from sglformer.neuron import NeuronBackendError, create_lif, resolve_backend, set_neuron_backend


def test_lif_parameters():
    lif = create_lif(0.5)
    assert isinstance(lif, sj_neuron.LIFNode)
    assert (lif.tau, lif.v_threshold, lif.v_reset, lif.decay_input, lif.detach_reset, lif.step_mode) == \
        (2.0, 0.5, 0.0, True, True, 'm')
    assert lif.surrogate_function.alpha == 4.0
    assert not list(lif.parameters()) and not list(lif.buffers())


def test_lif_dynamics_by_hand():
    """H = V + (X - V) / 2; spike when H >= 1; hard reset to 0."""
    lif = create_lif()
    x = torch.tensor([[1.5], [1.5], [0.4], [2.0]])
    # H: 0.75 (no), 1.125 (spike, V=0), 0.2 (no), 1.1 (spike)
    assert lif(x).flatten().tolist() == [0.0, 1.0, 0.0, 1.0]


def test_auto_is_torch_on_cpu(caplog):
    model = torch.nn.Sequential(create_lif(), create_lif(0.5))
    with caplog.at_level(logging.INFO, logger='sglformer'):
        assert set_neuron_backend(model, 'auto', torch.device('cpu')) == 'torch'
    assert all(m.backend == 'torch' for m in model)
    assert resolve_backend('auto', torch.device('cpu')) == ('torch', 'model runs on cpu')


def test_cupy_on_cpu_is_a_clear_error():
    with pytest.raises(NeuronBackendError, match="'cupy' needs the model on a CUDA device"):
        resolve_backend('cupy', torch.device('cpu'))


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the message on a machine without CUDA')
def test_cupy_on_cuda_without_a_gpu_says_why():
    with pytest.raises(NeuronBackendError, match='CUDA is not available'):
        resolve_backend('cupy', torch.device('cuda'))


def test_unknown_backend():
    with pytest.raises(ValueError, match='auto, torch, cupy'):
        resolve_backend('triton', torch.device('cpu'))


def test_model_resolves_backend_from_its_input(caplog):
    import timm
    model = timm.create_model('sglformer_cifar10', embed_dims=48, num_heads=4, T=1, neuron_backend='cupy').eval()
    with pytest.raises(NeuronBackendError):
        model(torch.rand(1, 3, 32, 32))
    model.set_neuron_backend('torch')
    with torch.no_grad():
        model(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError):
        model.set_neuron_backend('fast')


def test_auto_implementation_is_fused_on_cpu():
    from sglformer.neuron import resolve_implementation
    assert resolve_implementation('auto', torch.device('cpu')) == 'fused'
    assert resolve_implementation('spikingjelly', torch.device('cpu')) == 'spikingjelly'
    with pytest.raises(ValueError, match='spikingjelly, fused'):
        resolve_implementation('fast', torch.device('cpu'))


def test_training_options_choose_the_neuron():
    import argparse

    from sglformer.variants import create_model
    base = dict(model='sglformer_cifar10', dim=48, num_heads=4, time_step=1, device='cpu')
    assert create_model(argparse.Namespace(**base, neuron='auto')).neuron == 'fused'
    assert create_model(argparse.Namespace(**base, neuron='spikingjelly')).neuron == 'spikingjelly'
