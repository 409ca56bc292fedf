"""What the spiking units keep for the backward pass (sglformer.memory): the same numbers as module by
module, with spikingjelly's neurons and with the fused ones, in float32 and under float16 autocast, and
only what each unit is meant to keep."""
import contextlib
import copy

import pytest
import timm
import torch
from spikingjelly.activation_based import functional
from torch import nn

from sglformer import memory
from sglformer.layers import run_unit
from sglformer.neuron import STACK, create_lif

NEURONS = ('spikingjelly', 'fused')
MODELS = [  # small variants; BatchNorm scaled up below so that every layer fires
    ('sglformer_cifar10', dict(embed_dims=48, num_heads=4, T=2), (2, 3, 32, 32)),
    ('sglformer_cifar10dvs', dict(embed_dims=48, num_heads=4, T=2, img_size_h=64, img_size_w=64), (2, 2, 2, 64, 64)),
    ('sglformer_ima_8_384', dict(embed_dims=48, num_heads=4, depths=3, T=2, num_classes=5), (3, 3, 32, 32)),
    ('sglformer_ima2_8_384', dict(embed_dims=48, num_heads=4, depths=3, T=2, num_classes=5), (3, 3, 32, 32)),
]


def assert_same(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.dtype == e.dtype and torch.equal(a, e)


def unit(channels, pool, implementation):
    torch.manual_seed(3)
    conv = nn.Conv2d(3, channels, 3, padding=1, bias=False)
    bn = nn.BatchNorm2d(channels)
    nn.init.uniform_(bn.weight, 1.0, 3.0)
    nn.init.uniform_(bn.bias, -0.5, 0.5)
    return conv, bn, nn.MaxPool2d(3, 2, 1) if pool else None, create_lif(1.0, implementation)


def unit_results(implementation, recompute, pool=False, recompute_conv=False, calls=1, merged=False, amp=False):
    """Spikes, every gradient, BatchNorm's statistics and the final membrane of ``calls`` calls of a unit."""
    conv, bn, pool, lif = unit(6, pool, implementation)
    x = torch.randn(4, 3, 3, 9, 11, generator=torch.Generator().manual_seed(0), requires_grad=not recompute_conv)
    with memory.saving_memory() if recompute else contextlib.nullcontext():
        with torch.autocast('cpu', dtype=torch.float16, enabled=amp):
            spikes = torch.stack([run_unit(conv, bn, pool, lif, x * (call + 1), merged, recompute_conv)
                                  for call in range(calls)])
    weights = torch.randn(spikes.shape, generator=torch.Generator().manual_seed(1))
    (spikes * weights).sum().backward()
    grads = [t.grad for t in (x, conv.weight, bn.weight, bn.bias) if t.grad is not None]
    return [spikes, *grads, *bn.state_dict().values(), lif.v.detach()]


@pytest.mark.parametrize('implementation', NEURONS)
@pytest.mark.parametrize('pool, recompute_conv, merged', [
    (False, False, False), (True, False, False), (False, False, True), (False, True, False), (True, True, False)],
    ids=['unit', 'pooled', 'T*B-steps', 'input-unit', 'pooled-input-unit'])
@pytest.mark.parametrize('calls', [1, 2], ids=['one-call', 'membrane-carried'])
def test_a_unit_that_saves_memory_computes_what_it_computes_module_by_module(implementation, pool, recompute_conv,
                                                                           merged, calls):
    expected = unit_results(implementation, False, pool, recompute_conv, calls, merged)
    assert_same(unit_results(implementation, True, pool, recompute_conv, calls, merged), expected)
    assert 0 < expected[0].mean() < 1


def saved(fn):
    """``{dtype: bytes}`` of the tensors, parameters excepted, that ``fn()`` leaves for the backward pass, as
    the active saving_memory keeps them."""
    found = {}
    store = getattr(memory._active, 'store', None)

    def pack(tensor):
        packed = store.pack(tensor) if store is not None else tensor
        kept = packed[0] if isinstance(packed, tuple) else packed
        if not isinstance(tensor, nn.Parameter):
            found[kept.untyped_storage().data_ptr()] = (kept.dtype, kept.untyped_storage().nbytes())
        return packed
    with torch.autograd.graph.saved_tensors_hooks(pack, store.unpack if store is not None else lambda t: t):
        fn()
    totals = {}
    for dtype, size in found.values():
        totals[dtype] = totals.get(dtype, 0) + size
    return totals


@pytest.mark.parametrize('implementation', NEURONS)
def test_a_unit_keeps_its_convolutions_output_or_its_input(implementation):
    conv, bn, _, lif = unit(6, False, implementation)
    x = torch.randn(4, 3, 3, 9, 11)
    y_bytes = 4 * 3 * 6 * 9 * 11 * 4

    def fresh_unit(**kwargs):
        functional.reset_net(lif)  # else the membrane carried from the call before is kept too
        return run_unit(conv, bn, None, lif, x, **kwargs)
    with memory.saving_memory():
        assert saved(fresh_unit) == {torch.float32: x.numel() * 4 + y_bytes}
        assert saved(lambda: fresh_unit(recompute_conv=True)) == {torch.float32: x.numel() * 4}
    assert bn.num_batches_tracked.item() == 2  # once per forward, never in a backward pass
    assert sum(saved(fresh_unit).values()) >= x.numel() * 4 + 2 * y_bytes


@pytest.mark.parametrize('height, width, index_dtype', [(9, 11, torch.int16), (200, 300, torch.int16),
                                                        (300, 300, torch.int32)])
def test_a_pooled_unit_keeps_compact_indices_but_not_the_pool_input(height, width, index_dtype):
    conv, bn, pool, lif = unit(2, True, 'fused')
    x = torch.rand(1, 1, 3, height, width).round()  # spikes: kept as booleans by the convolution
    pooled = 2 * ((height + 1) // 2) * ((width + 1) // 2)
    with memory.saving_memory():
        kept = saved(lambda: run_unit(conv, bn, pool, lif, memory.spikes(x)))
    assert kept[torch.bool] == x.numel() and kept[index_dtype] == pooled * index_dtype.itemsize
    # BatchNorm's input (and its statistics, a few floats per channel) and the neuron's z = H - threshold
    assert 2 * height * width * 4 + pooled * 4 <= kept[torch.float32] <= 2 * height * width * 4 + pooled * 4 + 64
    if index_dtype == torch.int16:
        assert_same(unit_on(x, True), unit_on(x, False))  # the offset indices of planes over 32,767 elements


def unit_on(x, recompute):
    conv, bn, pool, lif = unit(2, True, 'fused')
    with memory.saving_memory() if recompute else contextlib.nullcontext():
        out = run_unit(conv, bn, pool, lif, x)
    out.sum().backward()
    return [out, conv.weight.grad, bn.weight.grad]


def test_spikes_and_counts_are_saved_compactly_unless_they_are_not_what_they_seem():
    conv = nn.Conv2d(3, 4, 1)
    spikes = torch.rand(6, 3, 5, 5).round()
    counts = spikes * 3
    for tensor, registered, dtype in ((spikes, memory.spikes, torch.bool), (counts, memory.counts, torch.uint8)):
        with memory.saving_memory():
            kept = saved(lambda: conv(registered(tensor.clone())))
        assert kept == {dtype: tensor.numel()}
    with memory.saving_memory():
        assert saved(lambda: conv(memory.counts(counts.clone() + 0.5))) == {torch.float32: counts.numel() * 4}
        changed = memory.spikes(spikes.clone())
        changed.mul_(3.0)  # changed in place: saved as it is
        assert saved(lambda: conv(changed)) == {torch.float32: spikes.numel() * 4}


def fire_everywhere(model):
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.uniform_(module.weight, 1.0, 4.0)
    return model


def model_results(name, kwargs, x, implementation, recompute, amp=False):
    torch.manual_seed(0)
    model = fire_everywhere(timm.create_model(name, neuron=implementation, recompute=recompute, **kwargs))
    with torch.autocast('cpu', dtype=torch.float16, enabled=amp):
        out = model(x)
    scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 4, enabled=amp)
    scaler.scale(out.float().square().sum()).backward()
    with torch.no_grad():
        evaluated = model.eval()(x)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return [out.detach(), evaluated, *grads, *model.state_dict().values()]


@pytest.mark.parametrize('name, kwargs, shape', MODELS, ids=[m[0] for m in MODELS])
def test_models_compute_the_same_numbers_with_every_neuron_and_memory_saving(name, kwargs, shape):
    x = torch.rand(shape)
    expected = model_results(name, kwargs, x, 'spikingjelly', False)
    for implementation in NEURONS:
        for recompute in (False, True):
            assert_same(model_results(name, kwargs, x, implementation, recompute), expected)


@pytest.mark.parametrize('name, kwargs, shape', MODELS[::2], ids=[m[0] for m in MODELS[::2]])
def test_models_under_float16_autocast_compute_the_same_numbers_with_every_neuron(name, kwargs, shape):
    """The CPU rehearses CUDA's autocast: float16 convolutions, spikingjelly's neurons in the dtype its
    stack computes them in, and the fused neurons in the same one."""
    x = torch.rand(shape)
    expected = model_results(name, kwargs, x, 'spikingjelly', False, amp=True)
    assert expected[0].dtype == torch.float16 and all(torch.isfinite(t).all() for t in expected[2:])
    for implementation in NEURONS:
        assert_same(model_results(name, kwargs, x, implementation, True, amp=True), expected)


def test_under_autocast_the_fused_path_keeps_the_dtypes_spikingjelly_keeps():
    """It neither widens what spikingjelly keeps in float16 nor narrows what it keeps in float32:
    spikingjelly 0.0.0.0.14's neurons run in float32 under CPU autocast, spikingjelly 2's in float16."""
    x = torch.randn(4, 3, 101).half()
    kept = {}
    for implementation in NEURONS:
        lif = create_lif(1.0, implementation)
        with torch.autocast('cpu', dtype=torch.float16):
            kept[implementation] = set(saved(lambda: lif(x.clone().requires_grad_())))
    assert kept['fused'] == kept['spikingjelly'] == {torch.float32 if STACK.startswith('spikingjelly 0.')
                                                     else torch.float16}
    conv, bn, _, lif = unit(6, False, 'fused')  # the unit keeps its convolution's float16 output, as BatchNorm does
    with memory.saving_memory(), torch.autocast('cpu', dtype=torch.float16):
        assert set(saved(lambda: run_unit(conv, bn, None, lif, torch.rand(4, 3, 3, 9, 11)))) == {torch.float16}


def test_hooks_eval_and_recorded_membranes_run_module_by_module():
    conv, bn, _, lif = unit(6, False, 'fused')
    with memory.saving_memory():
        assert memory.recomputes(bn, lif, conv)
        handle = lif.register_forward_hook(lambda module, args, out: None)
        assert not memory.recomputes(bn, lif, conv)
        handle.remove()
        assert not memory.recomputes(bn.eval(), lif, conv)
        with torch.no_grad():
            assert not memory.recomputes(bn.train(), lif, conv)
        lif.store_v_seq = True
        assert not memory.recomputes(bn, lif, conv)
    assert not memory.recomputes(bn, copy.deepcopy(lif), conv)  # outside saving_memory
