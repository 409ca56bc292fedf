"""The energy and firing-rate report: counts by hand, hook hygiene and the command."""
import json
import logging
from pathlib import Path

import pytest
import timm
from conftest import REPO_ROOT
import torch
from torch import nn

from sglformer.build import synthetic_batches
from sglformer.energy import (E_AC_PJ, E_MAC_PJ, PJ_TO_MJ, EnergyMeter, attention_ops, firing_rate, input_kind, main,
                              measure, summarize)
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


SMALL_CIFAR = ['--model', 'sglformer_cifar10', '--dim', '48', '--num-heads', '4', '-T', '2', '--device', 'cpu']


def trained_small_cifar():
    """The command's small CIFAR model with BatchNorm statistics that make it fire on the command's
    synthetic batch (seed 0, 2 images), and that batch."""
    name, kwargs, _ = SMALL_MODELS['cifar10']
    model = timm.create_model(name, **kwargs)
    images = next(synthetic_batches(model, 1, 2, seed=0))
    return with_spikes(model, images), images


@pytest.mark.usefixtures('restore_logging')
def test_command_writes_json_and_png(tmp_path, capsys):
    out_json, out_png = tmp_path / 'reports' / 'energy.json', tmp_path / 'plots' / 'rates.png'  # folders made
    main(SMALL_CIFAR + ['--batches', '2', '--batch-size', '1', '--json', str(out_json), '--png', str(out_png)])
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
    from sglformer.data.cifar import CIFAR
    from sglformer.testing import write_synthetic_cifar

    write_synthetic_cifar(tmp_path / 'data', 'cifar10', train_per_class=1, test_per_class=1)
    model, _ = trained_small_cifar()
    torch.save(model.state_dict(), tmp_path / 'weights.pth')
    report = main(['-c', str(REPO_ROOT / 'cifar10' / 'cifar10.yml'), '--data-dir', str(tmp_path / 'data'),
                   '--no-download', '-j', '0', '--dim', '48', '--num-heads', '4', '-T', '2', '--batches', '2',
                   '-b', '3', '--device', 'cpu', '--resume', str(tmp_path / 'weights.pth')])
    assert report['images'] == 6 and report['model'] == 'sglformer_cifar10'
    assert report['input'].startswith('torch/cifar10 evaluation split')
    # The first six test images in order, normalised with cifar10.yml's mean and std as the evaluation does.
    images = torch.from_numpy(CIFAR(tmp_path / 'data', train=False, download=False).data[:6]).permute(0, 3, 1, 2)
    mean = torch.tensor([m * 255 for m in (0.4914, 0.4822, 0.4465)]).view(1, 3, 1, 1)
    std = torch.tensor([s * 255 for s in (0.2470, 0.2435, 0.2616)]).view(1, 3, 1, 1)
    normalised = images.float().sub(mean).div(std)
    assert report['totals'] == summarize(measure(model, normalised.split(3)))['totals']


@pytest.mark.usefixtures('restore_logging')
@pytest.mark.parametrize('flag, container', [('--resume', lambda sd: {'state_dict': sd, 'epoch': 3}),
                                             ('--initial-checkpoint', lambda sd: {'model': sd}),
                                             ('--finetune', lambda sd: sd)])
def test_command_measures_the_weights_it_is_given(tmp_path, flag, container):
    model, images = trained_small_cifar()
    state = {f'module.{key}': value for key, value in model.state_dict().items()}  # as DDP saves them
    torch.save(container(state), tmp_path / 'weights.pth')
    expected = summarize(measure(model, [images]))
    report = main(SMALL_CIFAR + ['--batch-size', '2', flag, str(tmp_path / 'weights.pth')])
    assert report['checkpoint'] == str(tmp_path / 'weights.pth')
    assert report['totals'] == expected['totals'] and report['neurons'] == expected['neurons']
    assert report['totals']['mean_firing_rate'] > 0.01


@pytest.mark.usefixtures('restore_logging')
def test_command_without_weights_says_it_measures_random_ones(capsys):
    model, images = trained_small_cifar()
    report = main(SMALL_CIFAR + ['--batch-size', '2'])
    assert report['checkpoint'] is None
    assert report['totals'] != summarize(measure(model, [images]))['totals']
    assert 'no weights given (--resume PATH): measuring the randomly initialised model' in capsys.readouterr().err


@pytest.mark.usefixtures('restore_logging')
def test_command_refuses_weights_that_do_not_fit_or_are_unsafe(tmp_path, capsys):
    model, _ = trained_small_cifar()
    torch.save(model.state_dict(), tmp_path / 'd48.pth')
    with pytest.raises(SystemExit):
        main(['--model', 'sglformer_cifar10', '--dim', '96', '--num-heads', '4', '-T', '2', '--device', 'cpu',
              '--resume', str(tmp_path / 'd48.pth')])
    assert 'does not fit SGLFormer' in capsys.readouterr().err
    torch.save({'state_dict': model.state_dict(), 'extra': Path('x')}, tmp_path / 'unsafe.pth')
    with pytest.raises(SystemExit):
        main(SMALL_CIFAR + ['--resume', str(tmp_path / 'unsafe.pth')])
    assert 'could run code when unpickled' in capsys.readouterr().err


@pytest.mark.usefixtures('restore_logging')
@pytest.mark.parametrize('argv, message', [
    (['-T', '2'], 'name the model'),
    (SMALL_CIFAR + ['--checkpoint', 'w.pth'], '--checkpoint is gone: load weights with --resume PATH'),
    (SMALL_CIFAR + ['--resume', 'a.pth', '--initial-checkpoint', 'b.pth'], 'both resume and initial_checkpoint'),
    (SMALL_CIFAR + ['--resume', 'missing.pth'], 'checkpoint missing.pth does not exist'),
    (SMALL_CIFAR + ['--lr', '0.1'], "'lr' does not apply here (--lr on the command line): it is used by a training"),
    (SMALL_CIFAR + ['--val-batch-size', '4'], "'val_batch_size' does not apply here"),
    (SMALL_CIFAR + ['--patch-size', '16'], "'patch_size' is 16"),
    (SMALL_CIFAR + ['--mean', '0.5', '0.5', '0.5', '--std', '1', '1', '1'],
     "'mean', 'std' (on the command line) only act when the report reads a dataset's evaluation split"),
    (SMALL_CIFAR + ['--mean', '0.5', '0.5', '0.5'],
     "'mean' (on the command line) only acts when the report reads a dataset's evaluation split, and it reads "
     'synthetic inputs: remove it'),
    (SMALL_CIFAR + ['--input', 'x.pt', '--seed', '3', '-j', '2'], "'workers' (on the command line) only acts"),
    (SMALL_CIFAR + ['--input', 'x.pt', '--seed', '3'], "'seed' (on the command line) only acts when the report reads "
                                                       'synthetic inputs, and it reads an --input file'),
    (SMALL_CIFAR + ['--input', 'x.pt', '--data-dir', 'data'], '--input and --data-dir both name the inputs'),
    (SMALL_CIFAR + ['--input', 'missing.pt'], '--input missing.pt: No such file or directory'),
    (SMALL_CIFAR + ['--input', '.'], '--input .: Is a directory'),
    (SMALL_CIFAR + ['--input', str(REPO_ROOT / 'README.md')], 'README.md is not a torch.save file of one tensor'),
    (SMALL_CIFAR + ['--device', 'gpu0'], "--device 'gpu0' is not a device name: use cpu, cuda or cuda:N"),
    (SMALL_CIFAR + ['--mlp-ratio', '0.01'], 'leaves the MLP no hidden channels'),
    (SMALL_CIFAR + ['--json', '/proc/no/report.json'], 'could not write /proc/no/report.json'),
    (SMALL_CIFAR + ['--data-dir', 'data'], '-c cifar10/cifar10.yml'),
    (SMALL_CIFAR + ['--batches', '0'], '--batches must be at least 1, got 0'),
    (SMALL_CIFAR + ['--e-mac', '-1'], '--e-mac is an energy in pJ and must be a finite number >= 0'),
    (SMALL_CIFAR + ['--num-heads', '5'], 'sglformer_cifar10 cannot be built with these options'),
    (['--model', 'sglformer_nine'], "unknown model 'sglformer_nine'"),
])
def test_bad_input_is_one_clear_error(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and 'Traceback' not in err


@pytest.mark.usefixtures('restore_logging')
def test_missing_dataset_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(['-c', str(REPO_ROOT / 'cifar10' / 'cifar10.yml'), '--data-dir', str(tmp_path / 'none'), '--no-download'])
    assert 'cifar-10-batches-py' in capsys.readouterr().err


# Cross-check against spikingjelly 2's op_counter: the same small model, the same inputs, one forward.
try:
    from spikingjelly.activation_based import op_counter
except ImportError:
    op_counter = None
needs_op_counter = pytest.mark.skipif(op_counter is None, reason='op_counter is part of spikingjelly 2')


class OpCounts:
    """op_counter's SynOps, MACs and ACs of one forward, per module (its scopes are '<Class>.<name>')."""

    def __init__(self, model, x):
        counters = op_counter.SynOpCounter(), op_counter.MACCounter(), op_counter.ACCounter()
        with torch.no_grad(), op_counter.DispatchCounterMode(list(counters)):
            model(x)
        self.root = type(model).__name__
        self.synops, self.macs, self.acs = (counter.get_counts() for counter in counters)

    def of(self, records, name):
        return sum(records.get(f'{self.root}.{name}', {}).values())


def inputs_of(model, x, types):
    """The input of every module of ``types`` in one forward, by name."""
    seen = {}
    handles = [module.register_forward_pre_hook(lambda _, args, name=name: seen.setdefault(name, args[0]))
               for name, module in model.named_modules() if isinstance(module, types)]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return seen


@pytest.fixture(scope='module')
def cross_check():
    torch.manual_seed(0)
    name, kwargs, make_input = SMALL_MODELS['cifar10']
    x = make_input()
    model = with_spikes(timm.create_model(name, **kwargs), x)
    meter = measure(model, [x])
    return dict(model=model, x=x, images=x.shape[0], ours=summarize(meter),
                ours_mac=summarize(meter, nonbinary_as='mac'), theirs=OpCounts(model, x),
                inputs=inputs_of(model, x, (nn.Conv2d, nn.modules.batchnorm._BatchNorm)))


def layers_of(report, model, kind, kernel=None):
    """Layer entries of ``report`` whose input is ``kind``; ``kernel``: only Conv2d of that kernel side."""
    modules = dict(model.named_modules())
    return [entry for entry in report['layers'] if entry['input_kind'] == kind and
            (kernel is None or getattr(modules[entry['name']], 'kernel_size', None) == (kernel, kernel))]


@needs_op_counter
def test_op_counter_synops_equal_ours_where_every_spike_meets_the_whole_kernel(cross_check):
    # 1x1 convolutions and the attention products fed by spikes: the same count, up to float rounding
    # (ours is rate x FLOPs, a quotient); op_counter counts the whole batch, ours is per image.
    model, images, theirs = cross_check['model'], cross_check['images'], cross_check['theirs']
    compared = [entry for entry in layers_of(cross_check['ours'], model, 'spikes')
                if entry['type'] == 'SpikeAttention' or entry['name'].endswith('conv1x1')]
    assert len(compared) == 10 and sum(entry['sops'] for entry in compared) > 0
    for entry in compared:
        assert entry['sops'] * images == pytest.approx(theirs.of(theirs.synops, entry['name']), rel=1e-12, abs=0)


@needs_op_counter
def test_op_counter_clips_3x3_kernels_at_the_border_ours_charges_the_whole_kernel(cross_check):
    # A spike next to the zero padding reaches 6 (edge) or 4 (corner) of the 9 outputs; op_counter
    # counts the outputs actually reached, ours (rate x FLOPs, as the papers) charges all 9.
    model, images, theirs = cross_check['model'], cross_check['images'], cross_check['theirs']
    modules = dict(model.named_modules())
    compared = layers_of(cross_check['ours'], model, 'spikes', kernel=3)
    assert len(compared) == 6
    for entry in compared:
        conv, spikes = modules[entry['name']], cross_check['inputs'][entry['name']]
        fan_out = conv.out_channels // conv.groups
        reach = torch.nn.functional.conv2d(torch.ones(1, 1, *spikes.shape[2:]), torch.ones(1, 1, 3, 3), padding=1)
        assert entry['sops'] * images == pytest.approx(spikes.count_nonzero().item() * 9 * fan_out, rel=1e-12)
        assert theirs.of(theirs.synops, entry['name']) == (spikes.sum((0, 1)) * reach[0, 0]).sum().item() * fan_out
        assert theirs.of(theirs.synops, entry['name']) < entry['sops'] * images


@needs_op_counter
def test_op_counter_counts_sums_of_spikes_as_macs_ours_as_accumulates(cross_check):
    # Residual sums (values 0, 1, 2, ...) feed q/k/v_conv, conv1x1_1, mlp1 and full_size_conv. op_counter
    # sees no synaptic operation there and counts MACs, as ours with nonbinary_as='mac'; by default ours
    # counts accumulates at their non-zero rate.
    model, images, theirs = cross_check['model'], cross_check['images'], cross_check['theirs']
    sums = layers_of(cross_check['ours'], model, 'counts')
    assert len(sums) == 14
    for entry, as_mac in zip(sums, layers_of(cross_check['ours_mac'], model, 'counts')):
        assert theirs.of(theirs.synops, entry['name']) == 0
        assert theirs.of(theirs.macs, entry['name']) == as_mac['macs'] * images == entry['flops'] * images
        assert entry['counted_as'] == 'AC' and entry['macs'] == 0 and 0 < entry['sops'] < entry['flops']


@needs_op_counter
def test_op_counter_macs_of_the_first_layer_and_the_classifier_equal_ours(cross_check):
    # The image is convolved at each of the T steps in both counts; biases (the head has one) are in neither.
    model, images, theirs = cross_check['model'], cross_check['images'], cross_check['theirs']
    stem, head = layer(cross_check['ours'], 'stem.conv.conv3x3'), layer(cross_check['ours'], 'head')
    assert (stem['input_kind'], head['input_kind']) == ('real', 'real')
    assert theirs.of(theirs.macs, stem['name']) == stem['macs'] * images == model.T * images * 8 * 32 * 32 * 3 * 9
    assert theirs.of(theirs.macs, 'head') == head['macs'] * images == images * 10 * 48
    assert theirs.of(theirs.synops, stem['name']) == theirs.of(theirs.synops, 'head') == 0


@needs_op_counter
def test_op_counter_counts_batchnorm_and_additions_ours_does_not(cross_check):
    # MACCounter charges BN's scale and shift (one MAC per element), ACCounter its subtraction and every
    # addition (residuals, membrane updates); ours folds BN into the convolution and counts neither.
    model, images, theirs = cross_check['model'], cross_check['images'], cross_check['theirs']
    ours_mac = cross_check['ours_mac']
    batchnorms = {name: x for name, x in cross_check['inputs'].items()
                  if isinstance(dict(model.named_modules())[name], nn.modules.batchnorm._BatchNorm)}
    assert sum(theirs.macs['Global'].values()) - ours_mac['totals']['macs'] * images == \
        sum(x.numel() for x in batchnorms.values())
    for name, x in batchnorms.items():
        assert theirs.of(theirs.acs, name) == x.numel() + x.shape[1]
    lifs = [name for name, module in model.named_modules() if is_lif(module)]
    assert all(theirs.of(theirs.acs, name) > 0 for name in lifs)
    assert sum(theirs.acs['Global'].values()) > sum(theirs.synops['Global'].values())


@needs_op_counter
def test_op_counter_counts_per_forward_ours_per_image(cross_check):
    model, image = cross_check['model'], cross_check['x'][:1]
    one, twice = OpCounts(model, image), OpCounts(model, torch.cat([image, image]))
    assert sum(twice.synops['Global'].values()) == 2 * sum(one.synops['Global'].values()) > 0
    ours_twice, ours_once = (summarize(measure(model, [x]))['totals'] for x in (torch.cat([image, image]), image))
    assert ours_twice == ours_once


@needs_op_counter
@pytest.mark.parametrize('channels, tokens, heads', [(8, 6, 2), (8, 3, 1)])  # kᵀ v first, then q kᵀ first
def test_op_counter_counts_attention_spike_pairs_as_ours(channels, tokens, heads):
    q, k, v = ((torch.rand(2, 3, channels, tokens) < 0.4).float() for _ in range(3))
    counter = op_counter.SynOpCounter()
    with torch.no_grad(), op_counter.DispatchCounterMode([counter]):
        SpikeAttention(heads)(q, k, v)
    assert counter.get_total() == attention_ops(q, k, v, heads)[1]


@needs_op_counter
def test_op_counter_simple_energy_shares_the_constants_and_adds_memory(cross_check):
    simple = op_counter.estimate_simple_energy(cross_check['model'], cross_check['x'])
    costs = op_counter.SimpleEnergyCostConfig()
    assert (costs.e_mac_pj, costs.e_ac_pj) == (E_MAC_PJ, E_AC_PJ) == (4.6, 0.9)
    theirs, images = cross_check['theirs'], cross_check['images']
    counts = simple.counts
    assert counts['mac'] == sum(theirs.macs['Global'].values())
    assert counts['synop'] == sum(theirs.synops['Global'].values())
    assert simple.energy_compute_pj == pytest.approx(4.6 * counts['mac'] + 0.9 * counts['ac'])
    # Parameter and neuron-state traffic at 24.96 pJ per byte, which ours leaves out, outweighs the arithmetic.
    assert simple.energy_total_pj - simple.energy_compute_pj == pytest.approx(
        costs.e_memory_pj_per_byte * counts['memory_access_bytes'])
    assert simple.energy_total_pj / images > 10 * cross_check['ours']['totals']['energy_mj'] / PJ_TO_MJ
