"""The CIFAR training script end to end on synthetic data in the real CIFAR layout."""
import argparse
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import FOLDER_MODELS, REPO_ROOT, crash_at_epoch
from conftest import train_script as train
from sglformer import engine, training
from sglformer.checkpoint import read_checkpoint
from sglformer.config import parse_args
from sglformer.data.cifar import write_synthetic_cifar

SMALL = ['--dim', '48', '--num-heads', '4', '-T', '1', '--workers', '0', '--no-download', '-b', '16', '-vb', '25',
         '--cooldown-epochs', '0', '--warmup-epochs', '0']


@pytest.fixture(scope='module')
def cifar_roots(tmp_path_factory):
    root = tmp_path_factory.mktemp('data')
    write_synthetic_cifar(root / 'c10', 'cifar10', train_per_class=4, test_per_class=2)
    write_synthetic_cifar(root / 'c100', 'cifar100', train_per_class=1, test_per_class=1)
    return {'cifar10': root / 'c10', 'cifar100': root / 'c100'}


@pytest.mark.parametrize('folder', ['cifar10', 'cifar100'])
def test_short_run_writes_the_run_folder(tmp_path, cifar_roots, folder):
    train(folder, '--data-dir', str(cifar_roots[folder]), *SMALL, '--epochs', '3', '--warmup-epochs', '1',
          '--cooldown-epochs', '0', '--checkpoint-hist', '2', '--output', str(tmp_path), '--experiment', 'run')
    run = tmp_path / 'run'
    names = {p.name for p in run.iterdir()}
    assert {'args.yaml', 'summary.csv', 'last.pth.tar', 'model_best.pth.tar', 'checkpoint-1.pth.tar',
            'checkpoint-2.pth.tar'} <= names
    assert 'checkpoint-0.pth.tar' not in names  # only the last two are kept
    assert any(n.startswith('events.out.tfevents') for n in names)
    assert not any(n.endswith('.tmp') for n in names)
    rows = (run / 'summary.csv').read_text().splitlines()
    assert rows[0] == 'epoch,train_loss,eval_loss,eval_top1,eval_top5,lr,img_per_s'
    assert [r.split(',')[0] for r in rows[1:]] == ['0', '1', '2']
    saved = yaml.safe_load((run / 'args.yaml').read_text())
    assert saved['model'] == FOLDER_MODELS[folder] and saved['dim'] == 48
    assert saved['neuron'] == 'fused'  # what --neuron auto takes on the CPU
    last = read_checkpoint(run / 'last.pth.tar')
    assert {'epoch', 'arch', 'state_dict', 'optimizer', 'version', 'args', 'metric'} <= set(last)
    assert last['epoch'] == 2 and isinstance(last['args'], argparse.Namespace)
    assert last['state_dict']['head.weight'].shape[0] == (10 if folder == 'cifar10' else 100)


def test_resume_equals_uninterrupted(tmp_path, cifar_roots):
    common = ['--data-dir', str(cifar_roots['cifar10']), *SMALL, '--epochs', '3', '--warmup-epochs', '1',
              '--cooldown-epochs', '1', '--output', str(tmp_path)]
    train('cifar10', *common, '--experiment', 'straight')

    with crash_at_epoch(2):
        train('cifar10', *common, '--experiment', 'stopped')
    assert read_checkpoint(tmp_path / 'stopped' / 'last.pth.tar')['epoch'] == 1
    train('cifar10', *common, '--resume', str(tmp_path / 'stopped' / 'last.pth.tar'))

    straight = read_checkpoint(tmp_path / 'straight' / 'last.pth.tar')
    resumed = read_checkpoint(tmp_path / 'stopped' / 'last.pth.tar')
    assert resumed['epoch'] == straight['epoch'] == 3
    for key, value in straight['state_dict'].items():
        assert torch.equal(value, resumed['state_dict'][key]), key
    for a, b in zip(straight['optimizer']['state'].values(), resumed['optimizer']['state'].values()):
        assert torch.equal(a['exp_avg'], b['exp_avg'])
    rows = (tmp_path / 'stopped' / 'summary.csv').read_text().splitlines()
    assert [r.split(',')[0] for r in rows[1:]] == ['0', '1', '2', '3']


@pytest.fixture(scope='module')
def trained_run(tmp_path_factory, cifar_roots):
    out = tmp_path_factory.mktemp('runs')
    train('cifar10', '--data-dir', str(cifar_roots['cifar10']), *SMALL, '--epochs', '1', '--output', str(out),
          '--experiment', 'trained')
    return out / 'trained'


def test_eval_prints_the_accuracy_line_and_writes_json(tmp_path, cifar_roots, trained_run, capsys):
    metrics = train('cifar10', '--data-dir', str(cifar_roots['cifar10']), *SMALL, '--eval', '--resume',
                    str(trained_run / 'model_best.pth.tar'), '--output', str(tmp_path), '--experiment', 'ev')
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert last_line == (f"* Acc@1 {metrics['top1']:.3f} Acc@5 {metrics['top5']:.3f} loss {metrics['loss']:.4f}")
    saved = json.loads((tmp_path / 'ev' / 'eval.json').read_text())
    assert saved['images'] == 20 and saved['top1'] == metrics['top1']
    assert read_checkpoint(trained_run / 'model_best.pth.tar')['metric'] == pytest.approx(metrics['top1'])


def test_eval_of_a_timm_saver_checkpoint_from_ddp(tmp_path, cifar_roots, trained_run, capsys):
    """The authors' CIFAR files: timm's CheckpointSaver container, argparse args, DDP's module. prefix."""
    weights = read_checkpoint(trained_run / 'last.pth.tar')['state_dict']
    authors = {'epoch': 399, 'arch': 'sglformer', 'version': 2, 'metric': 96.0,
               'args': argparse.Namespace(model='sglformer', dim=48, lr=1e-3),
               'state_dict': {'module.' + k: v for k, v in weights.items()}, 'optimizer': {}}
    torch.save(authors, tmp_path / 'authors.pth.tar')
    train('cifar10', '--data-dir', str(cifar_roots['cifar10']), *SMALL, '--eval', '--initial-checkpoint',
          str(tmp_path / 'authors.pth.tar'), '--output', str(tmp_path), '--experiment', 'ev')
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith('* Acc@1 ')


def test_authors_yaml_loads_unchanged(tmp_path):
    # The keys and the spelling of the authors' cifar10.yml (note 1e-3 and 6e-2: strings to PyYAML).
    authors = (
        'epochs: 400\ntime_step: 4\ndim: 384\nnum_heads: 16\npatch_size: 4\nmlp_ratio: 4\n'
        'data_dir: ../cifar-10-python/\ndataset: torch/cifar10\nnum_classes: 10\nimg_size: 32\n'
        'mean:\n    - 0.4914\n    - 0.4822\n    - 0.4465\nstd:\n    - 0.2470\n    - 0.2435\n    - 0.2616\n'
        'crop_pct: 1.0\nscale:\n    - 1.0\n    - 1.0\nratio: [1.0,1.0]\ncolor_jitter: 0.\ninterpolation: bicubic\n'
        'train_interpolation: bicubic\naa: rand-m9-n1-mstd0.4-inc1\nmixup: 0.5\nmixup_off_epoch: 200\n'
        'mixup_prob: 1.0\nmixup_mode: batch\nmixup_switch_prob: 0.5\ncutmix: 0.0\nreprob: 0.25\nremode: const\n'
        'amp: True\nbatch_size: 64\nval_batch_size: 64\nlr: 1e-3\nmin_lr: 1e-5\nsched: cosine\nweight_decay: 6e-2\n'
        'cooldown_epochs: 10\nwarmup_epochs: 20\nwarmup_lr: 0.00001\nopt: adamw\nsmoothing: 0.1\nworkers: 8\nlayer: 1\n')
    (tmp_path / 'cifar10.yml').write_text(authors)
    args = parse_args(['-c', str(tmp_path / 'cifar10.yml'), '--epochs', '5'], None, defaults={'model': 'sglformer_cifar10'})
    assert (args.lr, args.weight_decay, args.min_lr, args.amp, args.epochs) == (1e-3, 6e-2, 1e-5, True, 5)
    assert args.mean == [0.4914, 0.4822, 0.4465] and args.layer == 1 and args.model == 'sglformer_cifar10'
    ours = parse_args([], REPO_ROOT / 'cifar10' / 'cifar10.yml')
    for key in yaml.safe_load(authors):
        if key != 'data_dir':
            assert getattr(ours, key) == getattr(args, key) or key == 'epochs', key


def test_authors_flag_spellings():
    args = parse_args(['-data-dir', '/d', '-T', '2', '-L', '2', '-b', '8', '-vb', '4', '--num-heads', '2',
                       '--mlp-ratio', '2', '--no-amp', '--output', 'o', '--initial-checkpoint', 'w.pth'],
                      REPO_ROOT / 'cifar10' / 'cifar10.yml')
    assert (args.data_dir, args.time_step, args.layer, args.batch_size, args.val_batch_size) == ('/d', 2, 2, 8, 4)
    assert (args.num_heads, args.mlp_ratio, args.amp, args.output, args.initial_checkpoint) == (2, 2.0, False, 'o', 'w.pth')


def run_expecting_error(capsys, *flags):
    with pytest.raises(SystemExit) as exit_info:
        train('cifar10', *flags)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_yaml_typo_names_the_key_and_suggestions(tmp_path, capsys):
    (tmp_path / 'typo.yml').write_text('epochs: 3\nwarmup_epoch: 1\n')
    err = run_expecting_error(capsys, '-c', str(tmp_path / 'typo.yml'))
    assert "unknown key 'warmup_epoch'" in err and "'warmup_epochs'" in err
    (tmp_path / 'type.yml').write_text('epochs: many\n')
    assert "'epochs' must be an integer" in run_expecting_error(capsys, '-c', str(tmp_path / 'type.yml'))


def test_missing_data_dir_says_what_goes_where(tmp_path, capsys):
    err = run_expecting_error(capsys, '--data-dir', str(tmp_path / 'none'), *SMALL, '--epochs', '1',
                              '--output', str(tmp_path))
    assert 'cifar-10-batches-py' in err and 'data_batch_1' in err and 'download is off' in err


def test_checkpoint_of_another_variant_is_a_clear_error(tmp_path, cifar_roots, trained_run, capsys):
    err = run_expecting_error(capsys, '--data-dir', str(cifar_roots['cifar10']), '--dim', '96', *SMALL[2:],
                              '--eval', '--resume', str(trained_run / 'last.pth.tar'), '--output', str(tmp_path))
    assert 'does not fit SGLFormer' in err and 'another shape' in err


def test_a_new_run_never_overwrites_an_earlier_one(cifar_roots, trained_run, capsys):
    before = (trained_run / 'last.pth.tar').read_bytes()
    err = run_expecting_error(capsys, '--data-dir', str(cifar_roots['cifar10']), *SMALL, '--epochs', '1',
                              '--output', str(trained_run.parent), '--experiment', trained_run.name)
    assert 'already holds last.pth.tar' in err and '--resume' in err
    assert (trained_run / 'last.pth.tar').read_bytes() == before


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, cifar_roots, monkeypatch, capsys):
    real_loss = training.train_loss

    def poisoned(args, mixup_fn):
        loss = real_loss(args, mixup_fn)

        def wrapped(logits, targets):
            return loss(logits, targets) * (float('nan') if engine_epoch[0] >= 1 else 1.0)
        return wrapped

    engine_epoch = [0]
    real_epoch = engine.train_one_epoch

    def tracking(*args, **kwargs):
        engine_epoch[0] = args[5]
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(training, 'train_loss', poisoned)
    monkeypatch.setattr(engine, 'train_one_epoch', tracking)
    err = run_expecting_error(capsys, '--data-dir', str(cifar_roots['cifar10']), *SMALL, '--epochs', '3',
                              '--output', str(tmp_path), '--experiment', 'nan')
    assert 'the training loss is nan at epoch 1' in err and 'last good checkpoint' in err
    assert read_checkpoint(tmp_path / 'nan' / 'last.pth.tar')['epoch'] == 0


def test_torchrun_two_processes(tmp_path, cifar_roots):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    result = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', '29517',
         str(REPO_ROOT / 'cifar10' / 'train.py'), '--data-dir', str(cifar_roots['cifar10']), *SMALL, '-b', '8',
         '--epochs', '1', '--output', str(tmp_path), '--experiment', 'ddp'],
        capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = (tmp_path / 'ddp' / 'summary.csv').read_text().splitlines()
    assert len(rows) == 2
    assert read_checkpoint(tmp_path / 'ddp' / 'last.pth.tar')['epoch'] == 0
    assert sum('epoch 0: train loss' in line for line in result.stderr.splitlines()) == 1  # only rank 0 logs
