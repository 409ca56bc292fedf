"""The fused LIF neuron against the installed spikingjelly's, the switch between them, and the units that
recompute BatchNorm and neuron in the backward pass.

Exactness is bitwise (torch.equal): the fused neuron repeats spikingjelly's floating-point operations
in the same order. The goldens run with both neurons in test_models.py.
"""
import pytest
import timm
import torch
from spikingjelly.activation_based import functional, neuron as sj_neuron

from sglformer import fused
from sglformer.fused import compact_spike_saving
from sglformer.layers import norm_pool_fire
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


@pytest.mark.parametrize('name, kwargs, input_shape', [
    ('sglformer_cifar10', dict(embed_dims=48, num_heads=4, T=2), (2, 3, 32, 32)),
    ('sglformer_ima2_8_384', dict(embed_dims=48, num_heads=4, depths=3, T=2), (3, 3, 32, 32)),  # T*B neurons
])
def test_fused_model_equals_spikingjelly_model(name, kwargs, input_shape):
    """Whole models, compact saving of spikes included: outputs, every gradient, BatchNorm statistics."""
    x = torch.rand(input_shape)
    results = []
    for implementation in ('spikingjelly', 'fused'):
        torch.manual_seed(0)
        model = timm.create_model(name, neuron=implementation, **kwargs)
        for module in model.modules():
            if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                torch.nn.init.uniform_(module.weight, 1.0, 4.0)  # neurons that fire
        out = model(x)
        out.square().sum().backward()
        with torch.no_grad():
            evaluated = model.eval()(x)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        results.append([out.detach(), evaluated, *grads, *model.state_dict().values()])
    assert len(results[0]) == len(results[1])
    assert_same(results[1], results[0])


def test_spikes_are_saved_as_booleans(monkeypatch):
    unpacked = []
    unpack = fused._SpikeStore.unpack

    def spy(packed):
        unpacked.append(type(packed))
        return unpack(packed)
    monkeypatch.setattr(fused._SpikeStore, 'unpack', staticmethod(spy))
    lif = create_lif(implementation='fused')
    conv = torch.nn.Conv2d(3, 4, 1)
    x = torch.randn(2, 5, 3, 6, 6, requires_grad=True)
    with compact_spike_saving():
        out = conv(lif(x).flatten(0, 1))  # only the view outlives the statement
    out.sum().backward()
    assert tuple in unpacked  # the convolution's input came back from the boolean mask

    # A spike tensor changed in place is no longer spikes: it is saved as it is.
    functional.reset_net(lif)
    with compact_spike_saving():
        spikes = lif(x)
        spikes.mul_(3.0)
        out = conv(spikes.flatten(0, 1))
    weight_grad = torch.autograd.grad(out.sum(), conv.weight)[0]
    expected = torch.autograd.grad(conv(spikes.detach().flatten(0, 1)).sum(), conv.weight)[0]
    assert torch.equal(weight_grad, expected)


def unit_modules(channels=6, pool=True, threshold=1.0, implementation='fused'):
    torch.manual_seed(3)
    bn = torch.nn.BatchNorm2d(channels)
    torch.nn.init.uniform_(bn.weight, 1.0, 3.0)
    torch.nn.init.uniform_(bn.bias, -0.5, 0.5)
    return bn, torch.nn.MaxPool2d(3, 2, 1) if pool else None, create_lif(threshold, implementation)


def run_unit(implementation, y, pool=True, calls=1, merged=False):
    """Spikes, gradients of ``y`` and BatchNorm's parameters and its statistics after ``calls`` calls."""
    bn, pool, lif = unit_modules(y.shape[1], pool, implementation=implementation)
    y = y.clone().requires_grad_()
    outputs = [norm_pool_fire(bn, pool, lif, y * (call + 1), 4, merged) for call in range(calls)]
    spikes = torch.stack(outputs)
    weights = torch.randn(spikes.shape, generator=torch.Generator().manual_seed(1))
    (spikes * weights).sum().backward()
    return [spikes, y.grad, bn.weight.grad, bn.bias.grad, *bn.state_dict().values(), lif.v.detach()]


@pytest.mark.parametrize('pool, merged', [(True, False), (False, False), (False, True)],
                         ids=['pool', 'no-pool', 'T*B-steps'])
@pytest.mark.parametrize('calls', [1, 2], ids=['one-call', 'membrane-carried'])
def test_recomputing_unit_equals_module_by_module(pool, merged, calls):
    y = torch.randn(4 * 3, 6, 9, 11)
    assert_same(run_unit('fused', y, pool, calls, merged), run_unit('spikingjelly', y, pool, calls, merged))


def saved_bytes(fn):
    """Bytes of the tensors, parameters excepted, that ``fn()`` leaves for the backward pass."""
    saved = {}

    def pack(tensor):
        if not isinstance(tensor, torch.nn.Parameter):
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(saved.values())


def test_recomputing_unit_keeps_only_the_convolution_output():
    bn, _, lif = unit_modules(pool=False)
    y = torch.randn(8, 6, 9, 11, requires_grad=True)
    assert saved_bytes(lambda: norm_pool_fire(bn, None, lif, y, 4)) == y.numel() * 4
    assert bn.num_batches_tracked.item() == 1  # once per forward, never in a backward pass
    lif.__class__ = sj_neuron.LIFNode  # module by module: BatchNorm's input and the neuron's state
    assert saved_bytes(lambda: norm_pool_fire(bn, None, lif, y, 4)) >= 2 * y.numel() * 4


def test_pooled_unit_keeps_indices_but_not_the_pool_input():
    bn, pool, lif = unit_modules()
    y = torch.randn(8, 6, 9, 11, requires_grad=True)
    pooled = 8 * 6 * 5 * 6
    # BatchNorm's input (and its statistics, a few floats per channel), the indices as int32 and the
    # neuron's z = H - threshold
    expected = y.numel() * 4 + pooled * 4 + pooled * 4
    assert expected <= saved_bytes(lambda: norm_pool_fire(bn, pool, lif, y, 4)) <= expected + 4 * 6 * 4
    pool.register_forward_hook(lambda module, args, out: None)
    assert saved_bytes(lambda: norm_pool_fire(bn, pool, lif, y, 4)) > 2 * y.numel() * 4  # the module itself


def test_recomputing_unit_steps_aside_for_hooks_eval_and_stored_membranes():
    bn, _, lif = unit_modules(pool=False)
    assert fused.recomputable(bn, lif)
    handle = lif.register_forward_hook(lambda module, args, out: None)
    assert not fused.recomputable(bn, lif)
    handle.remove()
    assert not fused.recomputable(bn.eval(), lif)
    with torch.no_grad():
        assert not fused.recomputable(bn.train(), lif)
    lif.store_v_seq = True
    assert not fused.recomputable(bn, lif)
    y = torch.randn(8, 6, 9, 11, requires_grad=True)
    assert saved_bytes(lambda: norm_pool_fire(bn, None, lif, y, 4)) > y.numel() * 4
