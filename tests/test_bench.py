"""``python -m sglformer.bench``: variants side by side, their exactness against the baseline, memopt."""
import json

import pytest
import timm
import torch

from sglformer import bench
from sglformer.neuron import spikingjelly_memopt

SMALL = ['--model', 'sglformer_cifar10', '--batch', '2', '--dim', '48', '--num-heads', '4', '-T', '1',
         '--repeat', '1', '--warmup', '0']
needs_memopt = pytest.mark.skipif(spikingjelly_memopt() is None, reason='memopt comes with spikingjelly 2')


def test_bench_command_writes_json(tmp_path, capsys):
    path = tmp_path / 'bench.json'
    bench.main(SMALL + ['--neuron', 'spikingjelly,fused', '--json', str(path)])
    report = json.loads(path.read_text())
    assert [row['neuron'] for row in report['results']] == ['spikingjelly', 'fused']
    assert report['train_step_flops'] > 0 and report['input_shape'] == [2, 3, 32, 32]
    assert report['conditions_start']['stack'].startswith('spikingjelly ')
    for row in report['results']:
        assert row['train_step_s'] > 0 and row['eval_images_per_s'] > 0
        assert row['activation_bytes_per_image'] is None or row['activation_bytes_per_image'] > 0
        assert row['exact'] and row['grad_abs_diff'] == 0.0 and row['loss_abs_diff'] == 0.0
    out = capsys.readouterr().out
    assert '| spikingjelly | torch |' in out and '| fused | fused |' in out and out.count('| exact |') == 2


def test_compare_reports_how_far_a_variant_is_off():
    baseline = dict(loss=torch.tensor(2.0), grads={'w': torch.tensor([1.0, -4.0])}, buffers={'b': torch.zeros(1)})
    same = dict(loss=torch.tensor(2.0), grads={'w': torch.tensor([1.0, -4.0])}, buffers={'b': torch.zeros(1)})
    off = dict(loss=torch.tensor(2.5), grads={'w': torch.tensor([1.0, -3.0])}, buffers={'b': torch.zeros(1)})
    assert bench.compare(same, baseline)['exact']
    result = bench.compare(off, baseline)
    assert not result['exact']
    assert (result['loss_abs_diff'], result['loss_rel_diff']) == (0.5, 0.25)
    assert (result['grad_abs_diff'], result['grad_rel_diff'], result['buffer_abs_diff']) == (1.0, 0.25, 0.0)
    with pytest.raises(RuntimeError, match='same parameters'):
        bench.compare(dict(off, grads={}), baseline)


def test_unit_inputs_tell_spikes_from_images():
    model = timm.create_model('sglformer_cifar10', embed_dims=48, num_heads=4, T=1)
    kinds = bench.unit_inputs(model, torch.rand(2, 3, 32, 32))
    assert kinds['stem.conv'] == 'real' and kinds['tokenizer.conv1'] == 'spikes'
    assert kinds['blocks.0.loc.conv1x1_1'] in ('spikes', 'bytes')  # spikes plus spikes
    assert bench._kind(torch.tensor([0.0, 3.0, 255.0])) == 'bytes' and bench._kind(torch.tensor([256.0])) == 'real'


@needs_memopt
def test_memopt_variants_are_exact(capsys):
    report = bench.main(SMALL + ['--neuron', 'spikingjelly,memopt-checkpoint,memopt-bit,memopt-uint8,memopt-auto'])
    assert [row['exact'] for row in report['results']] == [True] * 5
    assert 'memopt-bit' in capsys.readouterr().out


@pytest.mark.skipif(spikingjelly_memopt() is not None, reason='checks the message without spikingjelly 2')
def test_memopt_names_say_which_stack_has_them(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(['--neuron', 'spikingjelly,memopt-bit'])
    assert 'the memopt-* variants need spikingjelly 2' in capsys.readouterr().err
