"""``python -m sglformer.bench``: variants side by side, their exactness against the baseline, memopt; and the
GPU script, rehearsed on the CPU."""
import json
import os
import subprocess
import sys
import time

import pytest
import timm
import torch

from conftest import REPO_ROOT
from sglformer import bench
from sglformer.neuron import STACK, spikingjelly_memopt

SMALL = ['--model', 'sglformer_cifar10', '--batch', '2', '--dim', '48', '--num-heads', '4', '-T', '1',
         '--repeat', '1', '--warmup', '0']
needs_memopt = pytest.mark.skipif(spikingjelly_memopt() is None, reason='memopt comes with spikingjelly 2')


def test_bench_command_writes_json(tmp_path, capsys):
    path = tmp_path / 'results' / 'bench.json'  # the folder is made
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


@pytest.mark.parametrize('flags, message', [
    (['--device', 'gpu0'], "--device 'gpu0' is not a device name"),
    (['--num-heads', '5'], 'sglformer_cifar10 cannot be built with these options (dim=48, num_heads=5, time_step=1)'),
    (['--json', '/proc/no/bench.json'], 'could not write /proc/no/bench.json'),
])
def test_bad_input_is_one_line(capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(SMALL + ['--neuron', 'fused'] + flags)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and 'Traceback' not in err


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
    spikes = bench.unit_inputs(model, torch.rand(2, 3, 32, 32))
    assert spikes['stem.conv'] is False and spikes['tokenizer.conv1'] is True


@needs_memopt
def test_memopt_variants_are_exact(capsys):
    report = bench.main(SMALL + ['--neuron', 'spikingjelly,memopt-checkpoint,memopt-bit,memopt-sparse,memopt-auto'])
    assert [row['exact'] for row in report['results']] == [True] * 5
    assert 'memopt-bit' in capsys.readouterr().out


@pytest.mark.skipif(spikingjelly_memopt() is not None, reason='checks the message without spikingjelly 2')
def test_memopt_names_say_which_stack_has_them(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(['--neuron', 'spikingjelly,memopt-bit'])
    assert 'the memopt-* variants need spikingjelly 2' in capsys.readouterr().err


def test_the_gpu_script_runs_every_stage_on_the_cpu(tmp_path):
    """``bash bench/gpu.sh --dry-run``: what a GPU machine runs, at tiny sizes, with the installed stack."""
    started = time.monotonic()
    done = subprocess.run(['bash', str(REPO_ROOT / 'bench' / 'gpu.sh'), '--dry-run'], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, PYTHON=sys.executable, RESULTS=str(tmp_path),
                                                WHEELS=str(tmp_path / 'no-wheels'), OMP_NUM_THREADS='1'))
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert time.monotonic() - started < 180
    stack = 'reference' if STACK.startswith('spikingjelly 0.') else 'sj2'
    stages = json.loads((tmp_path / 'gpu.json').read_text())['stages']
    assert stages == {'wheel': '0', f'install-{stack}': '0', f'goldens-{stack}-default': '0',
                      f'bench-{stack}-cifar10': '0', f'bench-{stack}-imagenet': '0', 'torchrun': '0'}
    table = (tmp_path / 'gpu.md').read_text()
    assert table.count('| passed |') == 6 and 'peak at batch 32 (GB)' in table and '| fused | fused |' in table
