"""The fused LIF neuron against the installed spikingjelly's, and the switch between them.

Exactness is bitwise (torch.equal): the fused neuron repeats spikingjelly's floating-point operations
in the same order. The goldens run with both neurons in test_models.py; the units that recompute are
tested with every neuron in test_memory.py.
"""
import pytest
import timm
import torch
from spikingjelly.activation_based import functional, neuron as sj_neuron

from sglformer.neuron import FusedLIFNode, create_lif, is_lif, neuron_implementation, use_neuron_implementation

# Odd sizes on purpose: on the CPU, which elements fall in a vectorised loop's tail changes the last
# bit of the surrogate's sigmoid, so a neuron that batches it differently from spikingjelly is caught.
SHAPES = [(4, 3, 5, 7), (4, 1001), (3, 2, 8, 33, 31), (12, 5, 33)]  # the last: T*B steps of [C, N]


def run_neuron(implementation, x, threshold, calls=1, reset_between=False):
    """Spikes of ``calls`` calls on multiples of ``x``, the final membrane and the gradient of ``x``."""
    lif = create_lif(threshold, implementation)
    x = x.clone().requires_grad_()
    outputs = []
    for call in range(calls):
        if reset_between:
            functional.reset_net(lif)
        outputs.append(lif(x * (call + 1)))
    spikes = torch.stack(outputs)
    weights = torch.randn(spikes.shape, generator=torch.Generator().manual_seed(1))
    (spikes * weights).sum().backward()
    return spikes, lif.v.detach(), x.grad


def assert_same(actual, expected):
    for a, e in zip(actual, expected):
        assert a.dtype == e.dtype and torch.equal(a, e)


@pytest.mark.parametrize('shape', SHAPES, ids=str)
@pytest.mark.parametrize('threshold', [1.0, 0.5])
def test_fused_equals_spikingjelly(shape, threshold):
    x = torch.randn(shape) * 1.5 + 0.4
    expected = run_neuron('spikingjelly', x, threshold)
    actual = run_neuron('fused', x, threshold)
    assert_same(actual, expected)
    assert 0 < expected[0].mean() < 1  # both spikes and silence


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_fused_equals_spikingjelly_in_other_dtypes(dtype):
    x = (torch.randn(4, 3, 1001) * 1.5 + 0.4).to(dtype)
    expected = run_neuron('spikingjelly', x, 0.5)
    assert expected[0].dtype == dtype
    assert_same(run_neuron('fused', x, 0.5), expected)


@pytest.mark.parametrize('reset_between', [False, True], ids=['membrane-carried', 'reset'])
def test_fused_equals_spikingjelly_over_several_calls(reset_between):
    """Without a reset the membrane, and its gradient, carry from one call into the next."""
    x = torch.randn(4, 2, 7, 9)
    expected = run_neuron('spikingjelly', x, 1.0, calls=3, reset_between=reset_between)
    assert_same(run_neuron('fused', x, 1.0, calls=3, reset_between=reset_between), expected)


def test_fused_equals_spikingjelly_at_the_threshold_and_on_strided_input():
    # 2.0 charges to exactly 1.0 in the first step: a spike (>=), with the surrogate at its peak.
    x = torch.tensor([2.0, 1.0, -0.5, 3.0]).repeat(4, 3, 1)
    assert_same(run_neuron('fused', x, 1.0), run_neuron('spikingjelly', x, 1.0))
    strided = torch.randn(4, 6, 5, 3).permute(0, 3, 1, 2)
    assert_same(run_neuron('fused', strided, 0.5), run_neuron('spikingjelly', strided, 0.5))


@pytest.mark.parametrize('threshold', [1.0, 0.5])
def test_fused_inference_equals_spikingjelly_eval(threshold):
    x = torch.randn(4, 3, 1001)
    expected_lif, fused_lif = create_lif(threshold).eval(), create_lif(threshold, 'fused').eval()
    with torch.no_grad():
        assert torch.equal(fused_lif(x), expected_lif(x))
    assert torch.equal(fused_lif.v, expected_lif.v)


def test_switching_keeps_modules_hooks_and_state_dict():
    model = timm.create_model('sglformer_cifar10', embed_dims=48, num_heads=4, T=2)
    neurons = [module for module in model.modules() if is_lif(module)]
    seen = []
    neurons[0].register_forward_hook(lambda module, args, out: seen.append(out.shape))
    keys = list(model.state_dict())

    model.set_neuron('fused')
    assert model.neuron == 'fused' and neuron_implementation(model) == 'fused'
    assert [module for module in model.modules() if is_lif(module)] == neurons  # the same objects
    assert all(type(module) is FusedLIFNode for module in neurons)
    assert list(model.state_dict()) == keys
    model(torch.rand(2, 3, 32, 32))
    assert len(seen) == 1

    model.set_neuron('spikingjelly')
    assert all(type(module) is sj_neuron.LIFNode for module in neurons)
    assert timm.create_model('sglformer_cifar10', embed_dims=48, num_heads=4, neuron='fused').neuron == 'fused'
    with pytest.raises(ValueError, match='spikingjelly, fused'):
        model.set_neuron('triton')


def test_membrane_state_and_stored_membranes_as_spikingjelly():
    """The membrane lives where the installed spikingjelly keeps it; ``store_v_seq`` runs its code."""
    x = torch.randn(4, 3, 5) * 1.5 + 0.4
    results = []
    for implementation in ('spikingjelly', 'fused'):
        lif = create_lif(implementation=implementation)
        assert lif.v == 0.0
        lif(x)
        after_call = lif.v.clone()
        functional.reset_net(lif)
        assert isinstance(lif.v, float) and lif.v == 0.0
        lif.store_v_seq = True
        results.append([after_call, lif(x), lif.v_seq, lif.v])
    assert_same(results[1], results[0])
    assert results[0][2].shape == (4, 3, 5)


def test_only_the_specified_neuron_can_be_fused():
    soft_reset = torch.nn.Sequential(sj_neuron.LIFNode(v_reset=None, step_mode='m'))
    with pytest.raises(ValueError, match='v_reset=None'):
        use_neuron_implementation(soft_reset, 'fused')
    assert type(soft_reset[0]) is sj_neuron.LIFNode
