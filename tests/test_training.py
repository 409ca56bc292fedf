"""The CIFAR training script end to end on synthetic data in the real CIFAR layout, and the pieces of a
run that must match the authors' timm script: the loader's augmentation order, checkpoint retention,
evaluation precision; options that would be ignored refused before anything is written."""
import argparse
import csv
import json
import os
import subprocess
import sys
import time

import pytest
import torch
import yaml
from timm.data import FastCollateMixup
from timm.data.loader import PrefetchLoader
from torch.utils.data import DataLoader, Subset

from conftest import FOLDER_MODELS, REPO_ROOT, assert_resumed_equals_straight, crash_at_epoch, free_port
from conftest import train_script as train
from sglformer import engine, training
from sglformer.build import resolve_device
from sglformer.checkpoint import read_checkpoint
from sglformer.config import Config, ConfigError, check, parse_args
from sglformer.data import build_datasets, build_train_batches
from sglformer.distributed import DistInfo
from sglformer.neuron import NeuronChoice
from sglformer.run_folder import RunFolder
from sglformer.testing import write_synthetic_cifar

MODEL = ['--dim', '48', '--num-heads', '4', '-T', '1', '--workers', '0', '--no-download', '-b', '16']
SMALL = [*MODEL, '-vb', '25', '--cooldown-epochs', '0', '--warmup-epochs', '0']  # training runs
EVAL = [*MODEL, '-vb', '25']  # evaluations: training options on the command line would be refused


@pytest.fixture(scope='module')
def cifar_roots(tmp_path_factory):
    root = tmp_path_factory.mktemp('data')
    write_synthetic_cifar(root / 'c10', 'cifar10', train_per_class=4, test_per_class=2)
    write_synthetic_cifar(root / 'c100', 'cifar100', train_per_class=1, test_per_class=1)
    return {'cifar10': root / 'c10', 'cifar100': root / 'c100'}


def summary(folder):
    with open(folder / 'summary.csv') as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize('folder', ['cifar10', 'cifar100'])
def test_short_run_writes_the_run_folder(tmp_path, cifar_roots, folder):
    train(folder, '--data-dir', str(cifar_roots[folder]), *SMALL, '--epochs', '2', '--warmup-epochs', '1',
          '--output', str(tmp_path), '--experiment', 'run')
    run = tmp_path / 'run'
    names = {p.name for p in run.iterdir()}
    assert {'args.yaml', 'summary.csv', 'log.txt', 'last.pth.tar', 'model_best.pth.tar', 'checkpoint-0.pth.tar',
            'checkpoint-1.pth.tar'} <= names
    assert any(n.startswith('events.out.tfevents') for n in names)
    assert not any(n.endswith('.tmp') for n in names) and 'run.lock' not in names
    assert [row['epoch'] for row in summary(run)] == ['0', '1']
    saved = yaml.safe_load((run / 'args.yaml').read_text())
    assert saved['model'] == FOLDER_MODELS[folder] and saved['dim'] == 48
    assert saved['neuron'] in ('fused', 'spikingjelly') and saved['neuron_backend'] != 'auto'  # what auto chose
    assert saved['device'] == 'cpu' and saved['amp'] is False and saved['val_batch_size'] == 25
    last = read_checkpoint(run / 'last.pth.tar')
    assert {'epoch', 'arch', 'state_dict', 'optimizer', 'version', 'args', 'metric'} <= set(last)
    assert last['epoch'] == 1 and isinstance(last['args'], argparse.Namespace)
    assert last['state_dict']['head.weight'].shape[0] == (10 if folder == 'cifar10' else 100)


def test_the_kept_checkpoints_are_the_best_by_top1_with_that_epochs_metric(tmp_path, cifar_roots):
    train('cifar10', '--data-dir', str(cifar_roots['cifar10']), *SMALL, '--epochs', '5', '--lr', '5e-3',
          '--checkpoint-hist', '2', '--output', str(tmp_path), '--experiment', 'kept')
    run = tmp_path / 'kept'
    top1 = {int(row['epoch']): float(row['eval_top1']) for row in summary(run)}
    best_two = sorted(top1, key=lambda epoch: (-top1[epoch], epoch))[:2]  # ties keep the earlier epoch
    kept = sorted(int(p.name.split('-')[1].split('.')[0]) for p in run.glob('checkpoint-*.pth.tar'))
    assert kept == sorted(best_two)
    for epoch in kept:
        assert read_checkpoint(run / f'checkpoint-{epoch}.pth.tar')['metric'] == pytest.approx(top1[epoch], abs=1e-4)
    assert read_checkpoint(run / 'model_best.pth.tar')['epoch'] == best_two[0]


def test_resume_equals_uninterrupted(tmp_path, cifar_roots):
    common = ['--data-dir', str(cifar_roots['cifar10']), *SMALL[:-4], '--epochs', '3', '--warmup-epochs', '1',
              '--cooldown-epochs', '1', '--mixup', '0.5', '--mixup-off-epoch', '2', '--reprob', '0.25',
              '--model-ema', '--model-ema-decay', '0.9', '--clip-grad', '0.1', '--clip-mode', 'agc',
              '--output', str(tmp_path)]
    train('cifar10', *common, '--experiment', 'straight')
    with crash_at_epoch(2):
        train('cifar10', *common, '--experiment', 'stopped')
    assert read_checkpoint(tmp_path / 'stopped' / 'last.pth.tar')['epoch'] == 1
    train('cifar10', *common, '--resume', str(tmp_path / 'stopped' / 'last.pth.tar'))

    straight = read_checkpoint(tmp_path / 'straight' / 'last.pth.tar')
    resumed = read_checkpoint(tmp_path / 'stopped' / 'last.pth.tar')
    assert resumed['epoch'] == 3 and 'state_dict_ema' in straight
    assert_resumed_equals_straight(resumed, straight)
    assert [{k: v for k, v in row.items() if k != 'img_per_s'} for row in summary(tmp_path / 'stopped')] == \
        [{k: v for k, v in row.items() if k != 'img_per_s'} for row in summary(tmp_path / 'straight')]


def cifar_options(root, *flags):
    cfg = parse_args(['--data-dir', str(root), *MODEL, *flags], REPO_ROOT / 'cifar10' / 'cifar10.yml')
    return check(cfg, 'train', 'cifar').replace(device='cpu')


def test_cifar_batches_are_mixed_as_uint8_then_normalised_and_erased_as_timms_prefetcher(cifar_roots):
    """timm's train.py with its prefetcher: mixup in the collate step on uint8 images (rounded), then the
    mixed batch normalised and randomly erased; never an erased patch blended into another image."""
    cfg = cifar_options(cifar_roots['cifar10'], '--reprob', '1.0', '--mixup', '0.5', '--mixup-prob', '1.0')
    train_set, _ = build_datasets(cfg)
    batches = build_train_batches(cfg, train_set, DistInfo(), torch.device('cpu'), 10)
    seed = engine.epoch_seed(cfg.seed, 3, 0)
    engine.seed_everything(seed)
    ours = next(iter(batches.epoch(3, seed)))

    order = list(batches.loader.sampler)[:cfg.batch_size]  # the same samples in the same order
    collate = FastCollateMixup(mixup_alpha=0.5, cutmix_alpha=0.0, prob=1.0, switch_prob=0.5, mode='batch',
                               label_smoothing=0.1, num_classes=10)
    loader = DataLoader(Subset(train_set, order), batch_size=cfg.batch_size, collate_fn=collate,
                        generator=torch.Generator())  # its own generator: torch's global stream is the transforms'
    timm_loader = PrefetchLoader(loader, mean=cfg.mean, std=cfg.std, device=torch.device('cpu'), re_prob=1.0,
                                 re_mode='const')
    engine.seed_everything(seed)
    reference = next(iter(timm_loader))
    assert torch.equal(ours[0], reference[0]) and torch.equal(ours[1], reference[1])
    erased = (ours[0] == 0).all(dim=1)  # const erasing writes 0 in every channel of the mixed batch
    assert erased.any(dim=(1, 2)).all() and ours[1].shape == (cfg.batch_size, 10)


@pytest.mark.parametrize('folder, amp, eval_amp, benchmark, deterministic, pin_memory', [
    ('cifar10', True, True, True, False, False), ('imagenet', True, True, True, False, True),
    ('cifar10-dvs', True, False, False, True, True), ('dvs128-gesture', True, False, False, True, True)])
def test_each_folder_runs_in_the_authors_precision_and_gpu_settings(monkeypatch, folder, amp, eval_amp, benchmark,
                                                                    deterministic, pin_memory):
    """The DVS scripts train under autocast and evaluate in float32, with deterministic cuDNN; the CIFAR and
    ImageNet ones do both under autocast, with cuDNN's benchmark mode. (Resolved as if on a GPU: on the CPU
    autocast applies only where --amp is given, and memory is not pinned.)"""
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(training, 'choose_neuron', lambda *args: NeuronChoice('fused', None, 'no GPU to probe'))
    recipe = REPO_ROOT / folder / f'{folder}.yml'
    cfg = training.resolve(parse_args(['--device', 'cuda'], recipe), DistInfo())
    assert (cfg.amp, cfg.eval_amp, cfg.cudnn_benchmark, cfg.cudnn_deterministic, cfg.pin_mem) == (
        amp, eval_amp, benchmark, deterministic, pin_memory)
    on_cpu = training.resolve(parse_args(['--device', 'cpu'], recipe), DistInfo())
    assert (on_cpu.amp, on_cpu.eval_amp, on_cpu.pin_mem) == (False, False, False)
    asked = training.resolve(parse_args(['--device', 'cpu', '--amp'], recipe), DistInfo())
    assert (asked.amp, asked.eval_amp) == (amp, eval_amp)


def test_each_process_of_a_multi_gpu_run_takes_its_own_gpu_and_a_missing_one_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    assert resolve_device('cuda:1') == torch.device('cuda', 1)
    assert resolve_device('cuda', DistInfo(rank=3, world_size=4, local_rank=1)) == torch.device('cuda', 1)
    with pytest.raises(ConfigError, match='this machine has 2 CUDA devices, cuda:0 to cuda:1'):
        resolve_device('cuda:2')


def test_training_and_evaluation_take_their_own_precision(monkeypatch):
    seen = {}
    monkeypatch.setattr(engine, 'train_one_epoch', lambda trainer, batches, epoch, cfg: seen.update(train=cfg.amp) or {})
    monkeypatch.setattr(engine, 'evaluate', lambda model, batches, device, amp, is_main: seen.update(eval=amp) or {})
    cfg = parse_args(['--neuron', 'fused'], REPO_ROOT / 'cifar10-dvs' / 'cifar10-dvs.yml').replace(
        device='cpu', amp=True, eval_amp=False, epochs=1)

    class Batches(list):
        def epoch(self, *args):
            return iter(self)

    trainer = engine.Trainer(None, None, None, argparse.Namespace(num_epochs=1, start_epoch=lambda e: None,
                                                                   lr_at=None), None, None)
    training.fit(cfg, trainer, Batches(), Batches(), None, 0)
    assert seen == {'train': True, 'eval': False}


@pytest.fixture(scope='module')
def trained_run(tmp_path_factory, cifar_roots):
    out = tmp_path_factory.mktemp('runs')
    train('cifar10', '--data-dir', str(cifar_roots['cifar10']), *SMALL, '--epochs', '1', '--output', str(out),
          '--experiment', 'trained')
    return out / 'trained'


def test_eval_prints_the_accuracy_line_and_writes_json(tmp_path, cifar_roots, trained_run, capsys):
    metrics = train('cifar10', '--data-dir', str(cifar_roots['cifar10']), *EVAL, '--eval', '--resume',
                    str(trained_run / 'model_best.pth.tar'), '--output', str(tmp_path), '--experiment', 'ev')
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert last_line == (f"* Acc@1 {metrics['top1']:.3f} Acc@5 {metrics['top5']:.3f} loss {metrics['loss']:.4f}")
    saved = json.loads((tmp_path / 'ev' / 'eval.json').read_text())
    assert saved['images'] == 20 and saved['top1'] == metrics['top1']
    assert read_checkpoint(trained_run / 'model_best.pth.tar')['metric'] == pytest.approx(metrics['top1'])
    train('cifar10', '--data-dir', str(cifar_roots['cifar10']), *EVAL, '--eval', '--resume',
          str(trained_run / 'model_best.pth.tar'), '--output', str(tmp_path), '--experiment', 'ev')
    assert json.loads((tmp_path / 'ev' / 'eval-1.json').read_text()) == saved  # the first is kept


def test_eval_of_a_timm_saver_checkpoint_from_ddp(tmp_path, cifar_roots, trained_run, capsys):
    """The authors' CIFAR files: timm's CheckpointSaver container, argparse args, DDP's module. prefix."""
    weights = read_checkpoint(trained_run / 'last.pth.tar')['state_dict']
    authors = {'epoch': 399, 'arch': 'sglformer', 'version': 2, 'metric': 96.0,
               'args': argparse.Namespace(model='sglformer', dim=48, lr=1e-3),
               'state_dict': {'module.' + k: v for k, v in weights.items()}, 'optimizer': {}}
    torch.save(authors, tmp_path / 'authors.pth.tar')
    train('cifar10', '--data-dir', str(cifar_roots['cifar10']), *EVAL, '--eval', '--initial-checkpoint',
          str(tmp_path / 'authors.pth.tar'), '--output', str(tmp_path), '--experiment', 'ev')
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith('* Acc@1 ')


def test_fine_tuning_says_that_it_drops_a_classifier_of_another_shape(tmp_path, cifar_roots, trained_run, capsys):
    train('cifar100', '--data-dir', str(cifar_roots['cifar100']), *SMALL, '--epochs', '1', '--initial-checkpoint',
          str(trained_run / 'last.pth.tar'), '--output', str(tmp_path), '--experiment', 'tuned')
    assert 'classifier weights of another shape left out (head.weight, head.bias)' in capsys.readouterr().err


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
    args = check(parse_args(['-c', str(tmp_path / 'cifar10.yml'), '--epochs', '5'], None,
                            defaults={'model': 'sglformer_cifar10'}), 'train', 'cifar')
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


def run_expecting_error(capsys, *flags, folder='cifar10'):
    with pytest.raises(SystemExit) as exit_info:
        train(folder, *flags)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_yaml_typo_names_the_key_and_suggestions(tmp_path, capsys):
    (tmp_path / 'typo.yml').write_text('epochs: 3\nwarmup_epoch: 1\n')
    err = run_expecting_error(capsys, '-c', str(tmp_path / 'typo.yml'))
    assert "unknown key 'warmup_epoch'" in err and "'warmup_epochs'" in err
    (tmp_path / 'type.yml').write_text('epochs: many\n')
    assert "'epochs' must be an integer" in run_expecting_error(capsys, '-c', str(tmp_path / 'type.yml'))


@pytest.mark.parametrize('flags, words', [
    (['--dim', '50', '--num-heads', '4'], 'dim=50, num_heads=4'),
    (['--img-size', '36'], 'token grid'),
    (['-b', '-8'], "'batch_size' must be at least 1"),
    (['--epochs', '0'], "'epochs' must be at least 1"),
])
def test_sizes_that_do_not_fit_end_in_one_message_and_create_nothing(tmp_path, cifar_roots, capsys, flags, words):
    err = run_expecting_error(capsys, '--data-dir', str(cifar_roots['cifar10']), *SMALL, '--epochs', '1', *flags,
                              '--output', str(tmp_path / 'out'))
    assert words in err and 'Traceback' not in err
    assert not (tmp_path / 'out').exists()


def test_imagenet_needs_two_layers(tmp_path, capsys):
    err = run_expecting_error(capsys, '--layer', '1', '--data_path', str(tmp_path), '--output_dir', str(tmp_path / 'o'),
                              folder='imagenet')
    assert 'depths' in err and 'at least 2' in err and not (tmp_path / 'o').exists()


def test_missing_data_dir_says_what_goes_where(tmp_path, capsys):
    err = run_expecting_error(capsys, '--data-dir', str(tmp_path / 'none'), *SMALL, '--epochs', '1',
                              '--output', str(tmp_path / 'out'))
    assert 'cifar-10-batches-py' in err and 'data_batch_1' in err and 'download is off' in err
    assert not (tmp_path / 'out').exists()


def test_checkpoint_of_another_variant_is_a_clear_error(tmp_path, cifar_roots, trained_run, capsys):
    err = run_expecting_error(capsys, '--data-dir', str(cifar_roots['cifar10']), '--dim', '96', *EVAL[2:],
                              '--eval', '--resume', str(trained_run / 'last.pth.tar'), '--output', str(tmp_path))
    assert 'does not fit SGLFormer' in err and 'another shape' in err


def test_a_new_run_never_overwrites_an_earlier_one(cifar_roots, trained_run, capsys):
    before = {p.name: p.read_bytes() for p in trained_run.iterdir() if p.is_file()}
    err = run_expecting_error(capsys, '--data-dir', str(cifar_roots['cifar10']), *SMALL, '--epochs', '1',
                              '--output', str(trained_run.parent), '--experiment', trained_run.name)
    assert 'already holds a run' in err and '--resume' in err
    assert {p.name: p.read_bytes() for p in trained_run.iterdir() if p.is_file()} == before


def test_a_run_into_a_folder_in_use_is_refused(tmp_path, cifar_roots, capsys):
    with RunFolder.open(tmp_path / 'busy', 'timm', Config({'model': 'other'}), num_epochs=1):
        err = run_expecting_error(capsys, '--data-dir', str(cifar_roots['cifar10']), *SMALL, '--epochs', '1',
                                  '--output', str(tmp_path), '--experiment', 'busy')
    assert 'is in use by another run' in err and f'pid {os.getpid()}' in err
    assert sorted(p.name for p in (tmp_path / 'busy').iterdir() if not p.name.startswith('events')) == ['args.yaml']


def test_resuming_into_a_folder_that_holds_another_run_is_refused(tmp_path, cifar_roots, trained_run, capsys):
    common = ['--data-dir', str(cifar_roots['cifar10']), *SMALL, '--epochs', '1', '--output', str(tmp_path)]
    train('cifar10', *common, '--experiment', 'other')
    before = (tmp_path / 'other' / 'last.pth.tar').read_bytes()
    err = run_expecting_error(capsys, *common[:-2], '--epochs', '2', '--output', str(tmp_path), '--experiment',
                              'other', '--resume', str(trained_run / 'last.pth.tar'))
    assert 'already holds another run' in err and str(trained_run) in err
    assert (tmp_path / 'other' / 'last.pth.tar').read_bytes() == before


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, cifar_roots, monkeypatch, capsys):
    real_trainer = training.build_trainer

    def poisoned(*args, **kwargs):
        trainer = real_trainer(*args, **kwargs)
        loss, calls = trainer.loss_fn, []

        def nan_after_first_epoch(logits, targets):
            calls.append(1)
            return loss(logits, targets) * (float('nan') if len(calls) > 4 else 1.0)  # 4 steps an epoch
        trainer.loss_fn = nan_after_first_epoch
        return trainer

    monkeypatch.setattr(training, 'build_trainer', poisoned)
    err = run_expecting_error(capsys, '--data-dir', str(cifar_roots['cifar10']), *SMALL, '-b', '10', '--epochs', '3',
                              '--output', str(tmp_path), '--experiment', 'nan')
    assert 'the training loss is nan at epoch 1' in err and 'last good checkpoint' in err
    assert read_checkpoint(tmp_path / 'nan' / 'last.pth.tar')['epoch'] == 0


def test_torchrun_two_processes(tmp_path, cifar_roots):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    result = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', free_port(),
         str(REPO_ROOT / 'cifar10' / 'train.py'), '--data-dir', str(cifar_roots['cifar10']), *SMALL, '-b', '8',
         '--epochs', '1', '--output', str(tmp_path), '--experiment', 'ddp'],
        capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(summary(tmp_path / 'ddp')) == 1
    assert read_checkpoint(tmp_path / 'ddp' / 'last.pth.tar')['epoch'] == 0
    assert sum('epoch 0: train loss' in line for line in result.stderr.splitlines()) == 1  # only rank 0 logs


def test_a_stopped_process_ends_the_run_within_the_timeout(tmp_path, cifar_roots):
    """One of two processes stops answering (SIGSTOP, as a stuck loader would): the other ends within
    the distributed timeout, naming the process that stopped."""
    env = dict(os.environ, OMP_NUM_THREADS='1', MASTER_ADDR='127.0.0.1', MASTER_PORT=free_port(), WORLD_SIZE='2')
    command = [sys.executable, str(REPO_ROOT / 'cifar10' / 'train.py'), '--data-dir', str(cifar_roots['cifar10']),
               *SMALL, '-b', '8', '--epochs', '50', '--dist-timeout', '0.1', '--output', str(tmp_path),
               '--experiment', 'stall']
    ranks = [subprocess.Popen(command, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), text=True,
                              stderr=subprocess.PIPE if r == 0 else subprocess.DEVNULL) for r in (0, 1)]
    try:
        while not (tmp_path / 'stall' / 'summary.csv').exists():  # both are past the start-up
            assert ranks[0].poll() is None, ranks[0].stderr.read()[-2000:]
            time.sleep(0.2)
        os.kill(ranks[1].pid, 19)  # SIGSTOP
        err = ranks[0].communicate(timeout=60)[1]
    finally:
        for process in ranks:
            process.kill()
    assert ranks[0].returncode == 2, err[-2000:]
    assert 'process rank 1 of this 2-process run stopped answering' in err
