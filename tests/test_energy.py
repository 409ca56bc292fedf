"""The energy and firing-rate report: counts by hand, hook hygiene and the command."""
import json
import logging

import pytest
import timm
from conftest import REPO_ROOT
import torch
from torch import nn

from sglformer.energy import (EnergyMeter, attention_ops, firing_rate, input_kind, main, measure,
                              summarize)
from sglformer.layers import SpikeAttention
from sglformer.neuron import create_lif, is_lif, reset_neurons


class OneConv(nn.Module):
    """Images ``[B, 2, 4, 4]`` repeated over T=2 steps -> Conv2d(2, 3, 3, padding 1) -> LIF."""

    T = 2

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1, bias=False)
        self.lif = create_lif()

    def forward(self, x):
        reset_neurons(self)
        x = x.unsqueeze(0).repeat(self.T, 1, 1, 1, 1)
        return self.lif(self.conv(x.flatten(0, 1)).reshape(self.T, *x.shape[1:2], 3, 4, 4))


# One step of OneConv per image: 3 output channels x 16 positions x (2 input channels x 9 taps).
ONE_CONV_FLOPS_PER_STEP = 3 * 16 * 2 * 9


def layer(report, name):
    return next(entry for entry in report['layers'] if entry['name'] == name)


def neuron(report, name):
    return next(entry for entry in report['neurons'] if entry['name'] == name)


def hooks_left(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def with_spikes(model, x):
    """An untrained model barely fires: give its BatchNorms the statistics of ``x`` so that it does."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = None
            module.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


def test_rates_and_kinds_of_known_tensors():
    assert firing_rate(torch.tensor([0., 1., 0., 1., 1., 0., 0., 0.])) == 3 / 8
    assert firing_rate(torch.tensor([[0., 2.], [0., 0.]])) == 1 / 4  # non-zero share, not the mean
    assert input_kind(torch.tensor([0., 1., 1.])) == 'spikes'
    assert input_kind(torch.zeros(3)) == 'spikes'
    assert input_kind(torch.tensor([0., 2., 1.])) == 'counts'
    assert input_kind(torch.tensor([0., 0.5])) == 'real'
    assert input_kind(torch.tensor([-1., 1.])) == 'real'


def test_conv_sops_by_hand():
    model = OneConv()
    x = torch.zeros(1, 2, 4, 4)
    x[0, 0, 0, :] = 1
    x[0, 1, :, 2] = 1  # 8 ones in 32 elements: rate 1/4
    report = summarize(measure(model, [x]))
    conv = layer(report, 'conv')
    assert conv['input_kind'] == 'spikes' and conv['binary'] and conv['counted_as'] == 'AC'
    assert conv['input_rate'] == 0.25
    assert conv['flops'] == 2 * 864  # T x FLOPs of one step
    assert conv['sops'] == pytest.approx(0.25 * 2 * 864)  # rate x T x FLOPs(step) = 432
    assert conv['macs'] == 0
    assert report['totals']['energy_mj'] == pytest.approx(0.9 * 432 * 1e-9)


def test_all_ones_input_gives_sops_equal_to_flops_times_T():
    model = OneConv()
    report = summarize(measure(model, [torch.ones(3, 2, 4, 4), torch.ones(1, 2, 4, 4)]))
    assert report['images'] == 4
    assert layer(report, 'conv')['sops'] == pytest.approx(ONE_CONV_FLOPS_PER_STEP * model.T)


def test_real_input_counts_as_mac():
    report = summarize(measure(OneConv(), [torch.full((2, 2, 4, 4), 0.5)]), e_mac=2.0)
    conv = layer(report, 'conv')
    assert (conv['input_kind'], conv['counted_as'], conv['sops']) == ('real', 'MAC', 0)
    assert conv['macs'] == ONE_CONV_FLOPS_PER_STEP * 2
    assert report['totals']['energy_mj'] == pytest.approx(2.0 * ONE_CONV_FLOPS_PER_STEP * 2 * 1e-9)


class TwoLayouts(nn.Module):
    """The same input through a time-first LIF ``[T, B, N]`` and a flattened one ``[T*B, N]``."""

    T = 2

    def __init__(self):
        super().__init__()
        self.time_first = create_lif()
        self.flattened = create_lif()

    def forward(self, x):  # x: [B, T, N]
        reset_neurons(self)
        x = x.transpose(0, 1)
        return self.time_first(x), self.flattened(x.flatten(0, 1))


def test_neuron_rates_per_time_step_in_both_layouts():
    # Input 4 fires at once (H = 4/2 >= 1, then hard reset), input 0 never does. Image 0 fires at both
    # steps, image 1 only at step 1: rates 0.5 then 1.0. Read as [B, T], the flattened neuron would
    # give 1.0 then 0.5.
    x = torch.zeros(2, 2, 5)
    x[0] = 4
    x[1, 1] = 4
    model = TwoLayouts()
    report = summarize(measure(model, [x]))
    for name, layout in (('time_first', '[T, B, ...]'), ('flattened', '[T*B, ...]')):
        entry = neuron(report, name)
        assert entry['firing_rate_per_step'] == [0.5, 1.0]
        assert entry['firing_rate'] == 0.75
        assert entry['layout'] == layout
    assert report['totals']['mean_firing_rate'] == 0.75


def test_attention_sops_by_hand():
    # One head, d = 2 channels <= N = 3 tokens: M = kᵀ v first, then q M. Layout [T, B, C, N].
    k = torch.tensor([[1., 0., 1.], [1., 1., 0.]])
    v = torch.tensor([[1., 1., 0.], [0., 1., 1.]])
    q = torch.tensor([[1., 0., 0.], [0., 0., 1.]])
    flops, sops, association = attention_ops(*(t[None, None] for t in (q, k, v)), num_heads=1)
    assert association == '(k^T v) first'
    assert flops == 2 * 3 * 2 * 2  # two products of N d² each
    # Pairs of spikes sharing a token: k has 2, 1, 1 spikes per token, v has 1, 2, 1: 2 + 2 + 1 = 5.
    # Then one row of d = 2 per spike of q: 2 spikes -> 4.
    assert sops == 5 + 4


@pytest.mark.parametrize('channels, tokens, heads', [(8, 6, 2), (8, 3, 1)])  # d <= N and d > N
def test_attention_sops_match_brute_force(channels, tokens, heads):
    q, k, v = ((torch.rand(2, 3, channels, tokens) < 0.4).float() for _ in range(3))
    flops, sops, association = attention_ops(q, k, v, heads)
    d = channels // heads
    q, k, v = (t.reshape(2, 3, heads, d, tokens) for t in (q, k, v))
    if d <= tokens:
        first = torch.einsum('tbhin,tbhjn->tbhij', k, v)  # kᵀ v, a sum of 0/1 terms
        assert sops == first.sum().item() + q.sum().item() * d
        assert flops == 2 * 3 * heads * 2 * tokens * d * d
    else:
        first = torch.einsum('tbhin,tbhim->tbhnm', q, k)  # q kᵀ
        assert sops == first.sum().item() + v.sum().item() * tokens
        assert flops == 2 * 3 * heads * 2 * tokens * tokens * d


SMALL_MODELS = {
    'cifar10': ('sglformer_cifar10', dict(embed_dims=48, num_heads=4, T=2), lambda: torch.randn(2, 3, 32, 32)),
    'cifar10dvs': ('sglformer_cifar10dvs', dict(embed_dims=48, num_heads=4, T=2, img_size_h=32, img_size_w=32),
                   lambda: (torch.rand(2, 2, 2, 32, 32) < 0.3).float()),
    'ima2': ('sglformer_ima2_8_384', dict(embed_dims=32, num_heads=2, depths=3, T=2, img_size_h=32, img_size_w=32),
             lambda: torch.randn(2, 3, 32, 32)),
}


@pytest.mark.parametrize('key', SMALL_MODELS)
def test_report_changes_no_output_and_leaves_no_hooks(key):
    name, kwargs, make_input = SMALL_MODELS[key]
    x = make_input()
    model = with_spikes(timm.create_model(name, **kwargs), x)
    with torch.no_grad():
        before = model(x)
        with EnergyMeter(model) as meter:
            during = model(x)
        after = model(x)
    assert torch.equal(during, before) and torch.equal(after, before)
    assert hooks_left(model) == 0
    model.train()
    measure(model, [x])
    assert model.training and hooks_left(model) == 0  # mode restored, hooks gone

    report = summarize(meter)
    assert report['images'] == 2 and report['totals']['mean_firing_rate'] > 0
    lifs = [n for n, m in model.named_modules() if is_lif(m)]
    assert [n['name'] for n in report['neurons']] == lifs
    assert all(len(n['firing_rate_per_step']) == 2 for n in report['neurons'])
    flattened = {n['name'] for n in report['neurons'] if n['layout'] == '[T*B, ...]'}
    assert flattened == ({'patch_embed.proj_lif', 'blocks.0.attn.proj_lif'} if key == 'ima2' else set())
    first = report['layers'][0]
    assert first['input_kind'] == ('spikes' if key == 'cifar10dvs' else 'real')
    assert any(entry['input_kind'] == 'counts' for entry in report['layers'])  # residual sums
    attention = [entry for entry in report['layers'] if entry['type'] == SpikeAttention.__name__]
    assert attention and all(entry['binary'] for entry in attention)


def test_nonbinary_convention():
    name, kwargs, make_input = SMALL_MODELS['cifar10']
    x = make_input()
    meter = measure(with_spikes(timm.create_model(name, **kwargs), x), [x])
    as_ac, as_mac = summarize(meter), summarize(meter, nonbinary_as='mac')
    counts = [i for i, entry in enumerate(as_ac['layers']) if entry['input_kind'] == 'counts']
    assert counts
    for i in counts:
        assert as_ac['layers'][i]['counted_as'] == 'AC' and as_mac['layers'][i]['counted_as'] == 'MAC'
        assert as_mac['layers'][i]['macs'] == as_ac['layers'][i]['flops']
    assert as_mac['totals']['macs'] > as_ac['totals']['macs']
    for report in (as_ac, as_mac):
        totals = report['totals']
        assert totals['energy_mj'] == pytest.approx((4.6 * totals['macs'] + 0.9 * totals['sops']) * 1e-9)
    with pytest.raises(ValueError, match='ac, mac'):
        summarize(meter, nonbinary_as='both')


def test_meter_used_by_hand():
    model = OneConv()
    with EnergyMeter(model) as meter:
        model(torch.ones(1, 2, 4, 4))
        assert hooks_left(model) == 3  # the model's pre-hook, the conv's and the neuron's hooks
    assert hooks_left(model) == 0
    assert meter.images == 1
    with pytest.raises(ValueError, match='no forward pass'):
        summarize(EnergyMeter(model))


@pytest.fixture
def restore_logging():
    """main() sets up the 'sglformer' logger; put it back so that other tests' caplog still sees it."""
    logger = logging.getLogger('sglformer')
    handlers, propagate, level = list(logger.handlers), logger.propagate, logger.level
    yield
    for handler in logger.handlers:
        if handler not in handlers:
            handler.close()
    logger.handlers[:] = handlers
    logger.propagate, logger.level = propagate, level


@pytest.mark.usefixtures('restore_logging')
def test_command_writes_json_and_png(tmp_path, capsys):
    out_json, out_png = tmp_path / 'energy.json', tmp_path / 'rates.png'
    main(['--model', 'sglformer_cifar10', '--dim', '48', '--num-heads', '4', '-T', '2', '--batches', '2',
          '--batch-size', '1', '--device', 'cpu', '--json', str(out_json), '--png', str(out_png)])
    report = json.loads(out_json.read_text())
    assert report['model'] == 'sglformer_cifar10' and report['images'] == 2 and report['time_steps'] == 2
    assert report['input'] == 'synthetic, seed 0'
    assert out_png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert 'Energy per image' in capsys.readouterr().out


@pytest.mark.usefixtures('restore_logging')
def test_command_on_event_frames_and_a_tensor_file(tmp_path):
    frames = (torch.rand(3, 2, 2, 32, 32) < 0.2).float()
    torch.save(frames, tmp_path / 'frames.pt')
    common = ['--model', 'sglformer_cifar10dvs', '--dim', '48', '--num-heads', '4', '-T', '2', '--img-size', '32',
              '--device', 'cpu', '--batch-size', '2', '--batches', '5']
    synthetic = main(common)
    assert synthetic['layers'][0]['input_kind'] == 'spikes' and synthetic['images'] == 10
    from_file = main(common + ['--input', str(tmp_path / 'frames.pt')])
    assert from_file['images'] == 3  # all there is


@pytest.mark.usefixtures('restore_logging')
def test_command_on_a_dataset_from_a_folder_config(tmp_path):
    from sglformer.data.cifar import write_synthetic_cifar

    write_synthetic_cifar(tmp_path / 'data', 'cifar10', train_per_class=1, test_per_class=1)
    report = main(['-c', str(REPO_ROOT / 'cifar10' / 'cifar10.yml'), '--data-dir', str(tmp_path / 'data'),
                   '--no-download', '-j', '0', '--dim', '48', '--num-heads', '4', '-T', '2', '--batches', '2', '-b', '3'])
    assert report['images'] == 6 and report['model'] == 'sglformer_cifar10'
    assert report['input'].startswith('torch/cifar10 evaluation split')


def test_bad_input_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(['-T', '2'])
    assert 'name the model' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(['--model', 'sglformer_cifar10', '--data-dir', str(tmp_path / 'none')])
    assert '-c cifar10/cifar10.yml' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(['-c', str(REPO_ROOT / 'cifar10' / 'cifar10.yml'), '--data-dir', str(tmp_path / 'none'), '--no-download'])
    assert 'cifar-10-batches-py' in capsys.readouterr().err
