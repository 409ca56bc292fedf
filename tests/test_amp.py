"""float16 AMP rehearsed on the CPU through the code CUDA runs (CPU autocast, torch.amp.GradScaler('cpu')):
a training step, an exact resume with the gradient scaler's state, and an evaluation under autocast, for
each kind of dataset. The models are tiny: this CPU has no fast half precision."""
import json

import pytest
import yaml

from conftest import assert_resumed_equals_straight, crash_at_epoch, train_script
from sglformer.checkpoint import LAYOUTS, read_checkpoint
from sglformer.testing import write_events_np, write_image_folder, write_synthetic_cifar

RUNS = {  # folder: (flags of a tiny run, its checkpoint layout)
    'cifar10': (['--dim', '24', '--num-heads', '2', '-T', '1', '--workers', '0', '--no-download', '-b', '8',
                 '-vb', '20', '--warmup-epochs', '0', '--cooldown-epochs', '0', '--device', 'cpu'], 'timm'),
    'cifar10-dvs': (['--dim', '24', '--num-heads', '2', '--T', '2', '-b', '6', '-j', '0', '--img-size', '128',
                     '--warmup-epochs', '0', '--cooldown-epochs', '0', '--device', 'cpu'], 'dvs'),
    'imagenet': (['--model', 'sglformer_ima_8_384', '--dim', '48', '--num-heads', '4', '--layer', '3', '-T', '1',
                  '--input_size', '32', '--nb_classes', '2', '--num_workers', '0', '--batch_size', '4',
                  '--warmup_epochs', '0', '--device', 'cpu'], 'mae'),
}


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp('amp')
    write_synthetic_cifar(root / 'cifar10', 'cifar10', train_per_class=2, test_per_class=2)
    write_events_np(root / 'cifar10-dvs' / 'events_np', {'airplane': 10, 'cat': 10}, 'cifar10')
    write_image_folder(root / 'imagenet', ('n1', 'n2'), {'train': 8, 'val': 2})
    return root


@pytest.mark.parametrize('folder', RUNS)
def test_amp_on_the_cpu_trains_resumes_exactly_and_evaluates(tmp_path, data, folder, capsys):
    flags, layout = RUNS[folder]
    common = ['--data-dir', str(data / folder), *flags, '--amp', '--epochs', '2', '--output', str(tmp_path)]
    train_script(folder, *common, '--experiment', 'straight')
    with crash_at_epoch(1):
        train_script(folder, *common, '--experiment', 'stopped')
    last = tmp_path / 'stopped' / LAYOUTS[layout].last
    train_script(folder, *common, '--experiment', 'stopped', '--resume', str(last))

    straight = read_checkpoint(tmp_path / 'straight' / LAYOUTS[layout].last)
    resumed = read_checkpoint(last)
    assert_resumed_equals_straight(resumed, straight, weights=LAYOUTS[layout].weights_key)
    scaler = LAYOUTS[layout].scaler_key
    assert resumed[scaler] == straight[scaler] and resumed[scaler]['scale'] > 0  # the scaler went on as it was
    settings = yaml.safe_load((tmp_path / 'stopped' / 'args.yaml').read_text())
    assert settings['amp'] is True and settings['device'] == 'cpu'

    capsys.readouterr()
    metrics = train_script(folder, '--data-dir', str(data / folder), *flags, '--eval', '--eval-amp', '--resume',
                           str(last), '--output', str(tmp_path), '--experiment', 'evaluated')
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith('* Acc@1 ')
    assert json.loads((tmp_path / 'evaluated' / 'eval.json').read_text())['top1'] == metrics['top1']
