"""Fault cases and bad inputs as a new user meets them (docs/faults.md): each ends in one line that says what
is wrong, loses nothing that was saved, and acts or refuses where settings change on resume."""
import errno
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
import yaml

from conftest import REPO_ROOT, free_port, train_script
from sglformer import training
from sglformer.checkpoint import read_checkpoint
from sglformer.data import event_files
from sglformer.testing import truncate_file, write_events_np, write_image_folder, write_synthetic_cifar

MODEL = ['--dim', '48', '--num-heads', '4', '-T', '1', '--workers', '0', '--no-download', '-b', '16', '-vb', '25']
SMALL = [*MODEL, '--cooldown-epochs', '0', '--warmup-epochs', '0']


@pytest.fixture(scope='module')
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp('faults')
    write_synthetic_cifar(root / 'c10', 'cifar10', train_per_class=4, test_per_class=2)
    write_synthetic_cifar(root / 'c100', 'cifar100', train_per_class=1, test_per_class=1)
    return root


@pytest.fixture(scope='module')
def trained(tmp_path_factory, cifar):
    """A finished two-epoch CIFAR-10 run."""
    out = tmp_path_factory.mktemp('trained')
    train_script('cifar10', '--data-dir', str(cifar / 'c10'), *SMALL, '--epochs', '2', '--output', str(out),
                 '--experiment', 'run')
    return out / 'run'


def one_line_error(capsys, folder, *flags):
    """Run ``folder``'s train.py expecting exit status 2; returns its one error line."""
    with pytest.raises(SystemExit) as exit_info:
        train_script(folder, *flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert 'Traceback' not in err
    errors = [line for line in err.splitlines() if ' error: ' in line]
    assert len(errors) == 1, err
    return errors[0]


def contents(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and not p.name.startswith('events.')}


@pytest.mark.parametrize('tensor', ['head.weight', 'stem.conv.conv3x3.weight'])
def test_non_finite_weights_are_refused_for_evaluation_energy_and_training(tmp_path, cifar, trained, capsys, tensor):
    checkpoint = read_checkpoint(trained / 'last.pth.tar')
    checkpoint['state_dict'][tensor][0] = float('nan')
    torch.save(checkpoint, tmp_path / 'diverged.pth.tar')
    expected = f"{tmp_path / 'diverged.pth.tar'} holds weights that are not finite (NaN or infinity) in {tensor}"
    flags = ['--data-dir', str(cifar / 'c10'), *MODEL, '--output', str(tmp_path / 'out')]
    assert expected in one_line_error(capsys, 'cifar10', *flags, '--eval', '--resume', str(tmp_path / 'diverged.pth.tar'))
    assert expected in one_line_error(capsys, 'cifar10', *flags, '--initial-checkpoint', str(tmp_path / 'diverged.pth.tar'))
    assert not (tmp_path / 'out').exists()
    from sglformer import energy
    with pytest.raises(SystemExit):
        energy.main(['--model', 'sglformer_cifar10', '--dim', '48', '--num-heads', '4', '-T', '1', '--resume',
                     str(tmp_path / 'diverged.pth.tar')])
    assert expected in capsys.readouterr().err


@pytest.mark.parametrize('name', ['../escaped', '/tmp/absolute', 'a/b', '..', 'x' * 300])
def test_an_experiment_name_stays_one_folder_inside_output(tmp_path, cifar, capsys, name):
    line = one_line_error(capsys, 'cifar10', '--data-dir', str(cifar / 'c10'), *SMALL, '--epochs', '1', '--output',
                          str(tmp_path / 'out'), '--experiment', name)
    assert ('must be the name of one folder' in line) or ('more than the 255 a file system allows' in line)
    assert not (tmp_path / 'out').exists() and not (tmp_path / 'escaped').exists()


@pytest.mark.parametrize('template', ['../{model}', '/tmp/{model}', '{model}/../../x'])
def test_a_run_name_stays_inside_output(tmp_path, cifar, capsys, template):
    line = one_line_error(capsys, 'cifar10', '--data-dir', str(cifar / 'c10'), *SMALL, '--epochs', '1', '--output',
                          str(tmp_path / 'out'), '--run-name', template)
    assert 'outside --output' in line and not any(tmp_path.iterdir())


def test_an_empty_test_split_is_refused_with_the_counts_per_class(tmp_path, capsys):
    write_events_np(tmp_path / 'events_np', {'airplane': 5, 'cat': 9}, 'cifar10')
    line = one_line_error(capsys, 'cifar10-dvs', '--data-path', str(tmp_path), '--dim', '48', '--num-heads', '4',
                          '--T', '2', '-b', '2', '-j', '0', '--device', 'cpu', '--output-dir', str(tmp_path / 'out'))
    assert ('the evaluation split of cifar10-dvs' in line and 'airplane: training 5, evaluation 0' in line
            and 'a class needs 10 or more' in line)
    assert not (tmp_path / 'out').exists()


def test_a_resume_with_another_batch_size_acts_and_records_it(tmp_path, cifar, trained):
    run = tmp_path / 'run'
    train_script('cifar10', '--data-dir', str(cifar / 'c10'), *SMALL, '--epochs', '1', '--output', str(tmp_path),
                 '--experiment', 'run')
    train_script('cifar10', '--data-dir', str(cifar / 'c10'), *SMALL, '--epochs', '2', '-b', '8', '--resume',
                 str(run / 'last.pth.tar'))
    settings = yaml.safe_load((run / 'args.yaml').read_text())
    assert settings['batch_size'] == 8 and settings['changes'] == [{'epoch': 1, 'batch_size': [16, 8],
                                                                    'epochs': [1, 2]}]
    assert read_checkpoint(run / 'last.pth.tar')['args'].batch_size == 8


def test_a_resume_with_no_epoch_left_is_refused(trained, cifar, capsys):
    before = contents(trained)
    line = one_line_error(capsys, 'cifar10', '--data-dir', str(cifar / 'c10'), *SMALL, '--epochs', '2', '--resume',
                          str(trained / 'last.pth.tar'))
    assert 'the run has trained 2 epochs, and --epochs 2 leaves none to train; pass --epochs 3 or more' in line
    assert contents(trained) == before


def test_an_evaluation_at_another_t_is_one_line_on_cifar(trained, cifar, tmp_path, capsys):
    line = one_line_error(capsys, 'cifar10', '--data-dir', str(cifar / 'c10'), *MODEL[:4], '-T', '2', *MODEL[6:],
                          '--eval', '--resume', str(trained / 'last.pth.tar'), '--output', str(tmp_path))
    assert 'was trained with T=1 time steps and this model has T=2' in line and 'pass -T 1' in line


def test_a_resume_with_another_thread_count_warns_once(tmp_path, cifar, capsys):
    run = tmp_path / 'run'
    flags = ['--data-dir', str(cifar / 'c10'), *SMALL, '--output', str(tmp_path)]
    train_script('cifar10', *flags, '--epochs', '1', '--experiment', 'run')
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        train_script('cifar10', *flags, '--epochs', '2', '--resume', str(run / 'last.pth.tar'))
    finally:
        torch.set_num_threads(threads)
    warnings = [line for line in capsys.readouterr().err.splitlines() if 'not bit-identical' in line]
    assert len(warnings) == 1 and f'threads {threads} -> {threads + 1}' in warnings[0]


@pytest.mark.parametrize('flags, words', [
    (['--aa', 'rand-x9'], "'aa' 'rand-x9' is not an augmentation policy of timm"),
    (['--opt', 'adamx'], "'opt' 'adamx' is not an optimiser of timm; did you mean"),
])
def test_bad_timm_names_are_one_line(tmp_path, cifar, capsys, flags, words):
    line = one_line_error(capsys, 'cifar10', '--data-dir', str(cifar / 'c10'), *SMALL, '--epochs', '1', *flags,
                          '--output', str(tmp_path))
    assert words in line and not any(tmp_path.iterdir())


@pytest.mark.parametrize('flags, words', [
    (['--device', 'gpu0'], "--device 'gpu0' is not a device name: use cpu, cuda or cuda:N"),
    (['--device', 'mps'], '--device mps: SGLFormer runs on cpu or cuda devices'),
    (['--interpolation', 'cubic'], "argument --interpolation: invalid choice: 'cubic'"),
    (['--train-interpolation', 'cubic'], "invalid choice: 'cubic'"),
    (['--run-name', '{modle}-{date}'], "--run-name '{modle}-{date}' cannot be filled in (KeyError: 'modle')"),
    (['--run-name', '{model'], 'cannot be filled in (ValueError'),
    (['--mlp-ratio', '0.01'], 'mlp_ratio 0.01 x dim 48 leaves the MLP no hidden channels'),
])
def test_names_and_sizes_that_cannot_work_are_one_line_before_anything_is_written(tmp_path, cifar, capsys, flags,
                                                                                  words):
    line = one_line_error(capsys, 'cifar10', '--data-dir', str(cifar / 'c10'), *SMALL, '--epochs', '1', *flags,
                          '--output', str(tmp_path / 'out'))
    assert words in line and not any(tmp_path.iterdir())


def test_labels_beyond_the_classifier_are_refused_before_training(tmp_path, cifar, capsys):
    line = one_line_error(capsys, 'cifar100', '--data-dir', str(cifar / 'c100'), *SMALL, '--epochs', '1',
                          '--num-classes', '10', '--output', str(tmp_path))
    assert 'holds 100 classes but the model has 10 outputs' in line and not any(tmp_path.iterdir())


def test_a_full_disk_while_making_frames_names_the_folder(tmp_path, capsys, monkeypatch):
    write_events_np(tmp_path / 'events_np', {'airplane': 11, 'cat': 11}, 'cifar10')

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(event_files, 'np_savez', full)
    line = one_line_error(capsys, 'cifar10-dvs', '--data-path', str(tmp_path), '--dim', '48', '--num-heads', '4',
                          '--T', '2', '-b', '2', '-j', '0', '--device', 'cpu', '--output-dir', str(tmp_path / 'out'))
    frames = tmp_path / 'frames_number_2_split_by_number'
    assert f'could not write {frames}: no space left on the device' in line and 'run again' in line


def test_a_run_that_never_saved_is_started_again_by_the_same_command(tmp_path, capsys):
    data = write_image_folder(tmp_path / 'imagenet', ('n1', 'n2'), {'train': 4, 'val': 2},
                              truncated=['train/n1/n1_0.JPEG'])
    flags = ['--data_path', str(data), '--model', 'sglformer_ima_8_384', '--dim', '48', '--num-heads', '4', '--layer',
             '3', '-T', '1', '--input_size', '32', '--nb_classes', '2', '--num_workers', '0', '--device', 'cpu',
             '--batch_size', '2', '--epochs', '1', '--warmup_epochs', '0', '--output_dir', str(tmp_path / 'run')]
    assert 'n1_0.JPEG cannot be read as an image' in one_line_error(capsys, 'imagenet', *flags)
    assert (tmp_path / 'run' / 'args.yaml').exists()
    write_image_folder(tmp_path / 'fixed', ('n1',), {'train': 1})
    (tmp_path / 'fixed' / 'train' / 'n1' / 'n1_0.JPEG').replace(data / 'train' / 'n1' / 'n1_0.JPEG')
    train_script('imagenet', *flags)
    assert read_checkpoint(tmp_path / 'run' / 'checkpoint-last.pth')['epoch'] == 0


def start(command, **kwargs):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    return subprocess.Popen(command, env=dict(env, **kwargs.pop('env', {})), text=True, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, **kwargs)


def two_processes(command, timeout):
    """``(exit statuses, error outputs)`` of the two processes of a two-process gloo run of ``command``."""
    env = dict(MASTER_ADDR='127.0.0.1', MASTER_PORT=free_port(), WORLD_SIZE='2')
    ranks = [start(command, env=dict(env, RANK=str(r), LOCAL_RANK=str(r))) for r in (0, 1)]
    try:
        errs = [process.communicate(timeout=timeout)[1] for process in ranks]
    finally:
        for process in ranks:
            process.kill()
    return [process.returncode for process in ranks], errs


@pytest.mark.parametrize('sent, status', [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupt_prints_one_line_with_the_resume_command(tmp_path, cifar, sent, status):
    command = [sys.executable, str(REPO_ROOT / 'cifar10' / 'train.py'), '--data-dir', str(cifar / 'c10'), *SMALL,
               '--epochs', '50', '--output', str(tmp_path), '--experiment', 'run']
    # A background job of a shell starts with SIGINT ignored, and Python keeps it so: give the run the
    # disposition of a terminal's foreground process, whatever started the suite.
    process = start(command, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        while not (tmp_path / 'run' / 'last.pth.tar').exists():
            assert process.poll() is None, process.stderr.read()[-2000:]
            time.sleep(0.1)
        process.send_signal(sent)
        err = process.communicate(timeout=120)[1]
    finally:
        process.kill()
    assert process.returncode == status, err[-2000:]
    assert 'Traceback' not in err and not (tmp_path / 'run' / 'run.lock').exists()
    line = err.strip().splitlines()[-1]
    assert ('stopped by SIGTERM during epoch ' if sent == signal.SIGTERM else 'interrupted during epoch ') in line
    continued = shlex.split(line.split('Continue with: ')[1])
    assert continued[1:] == [*command[1:], '--resume', str(tmp_path / 'run' / 'last.pth.tar')]


def test_a_signal_while_an_epoch_is_recorded_names_that_epoch_and_its_checkpoint(tmp_path, monkeypatch):
    """The signal may arrive after an epoch's checkpoint is written and before the next epoch starts."""
    last = tmp_path / 'last.pth.tar'
    last.write_bytes(b'checkpoint')

    def record_epoch(trainer, folder, epoch, train_metrics, metrics):
        if epoch == 2:
            training._stop(signal.SIGTERM, None)

    monkeypatch.setattr(training, '_epoch', lambda *args: ({}, {}))
    monkeypatch.setattr(training, 'record_epoch', record_epoch)
    trainer = SimpleNamespace(schedule=SimpleNamespace(num_epochs=5))
    with pytest.raises(training.Stopped) as stopped:
        training.fit(None, trainer, None, None, SimpleNamespace(last=last), 1)
    line = training._where_stopped(stopped.value, ['-c', 'run.yml'])
    assert line.startswith('stopped by SIGTERM during epoch 2; ') and line.endswith(f'-c run.yml --resume {last}')


def test_a_stopped_process_0_is_reported_by_the_others_within_the_timeout(tmp_path, cifar):
    env = dict(MASTER_ADDR='127.0.0.1', MASTER_PORT=free_port(), WORLD_SIZE='2')
    command = [sys.executable, str(REPO_ROOT / 'cifar10' / 'train.py'), '--data-dir', str(cifar / 'c10'), *SMALL,
               '-b', '8', '--epochs', '50', '--dist-timeout', '0.25', '--output', str(tmp_path), '--experiment', 'stall']
    ranks = [start(command, env=dict(env, RANK=str(r), LOCAL_RANK=str(r))) for r in (0, 1)]
    try:
        while not (tmp_path / 'stall' / 'summary.csv').exists():
            assert ranks[0].poll() is None, ranks[0].stderr.read()[-2000:]
            time.sleep(0.2)
        os.kill(ranks[0].pid, signal.SIGSTOP)
        stopped = time.monotonic()
        err = ranks[1].communicate(timeout=60)[1]
        reported = time.monotonic() - stopped
    finally:
        for process in ranks:
            process.kill()
    assert ranks[1].returncode == 2, err[-2000:]
    assert 'stopped answering: process 1 waited 0.25 min (the --dist-timeout) for the others' in err
    assert reported < 0.25 * 60 + 8  # the timeout and a few seconds, not twice the timeout


def test_rank_0_failing_to_prepare_event_data_ends_the_others_at_once(tmp_path):
    (tmp_path / 'events_np' / 'airplane').mkdir(parents=True)  # a class folder without samples
    command = [sys.executable, str(REPO_ROOT / 'cifar10-dvs' / 'train.py'), '--data-path', str(tmp_path), '--dim',
               '48', '--num-heads', '4', '--T', '2', '-b', '2', '-j', '0', '--device', 'cpu', '--output-dir',
               str(tmp_path / 'out')]
    began = time.monotonic()
    statuses, errs = two_processes(command, timeout=120)
    assert statuses == [2, 2]
    assert 'has class folders without .npz files: airplane' in errs[0]
    assert 'process 0 could not prepare the data:' in errs[1] and 'airplane' in errs[1]
    assert time.monotonic() - began < 60  # not the 30 minutes of the default timeout


def test_unreadable_samples_count_over_all_processes(tmp_path):
    from torch.utils.data import DistributedSampler
    from torchvision.datasets import ImageFolder
    data = write_image_folder(tmp_path / 'imagenet', ('n1', 'n2'), {'train': 8, 'val': 2})
    samples = ImageFolder(str(data / 'train')).samples
    shards = [list(DistributedSampler(range(16), 2, rank, seed=0, drop_last=True)) for rank in (0, 1)]
    for shard in shards:  # two in each process's shard of the first epoch: three in all are allowed
        for index in shard[:2]:
            truncate_file(samples[index][0])
    command = [sys.executable, str(REPO_ROOT / 'imagenet' / 'train.py'), '--data_path', str(data), '--model',
               'sglformer_ima_8_384', '--dim', '48', '--num-heads', '4', '--layer', '3', '-T', '1', '--input_size',
               '32', '--nb_classes', '2', '--num_workers', '0', '--device', 'cpu', '--batch_size', '2', '--epochs',
               '1', '--warmup_epochs', '0', '--max-unreadable-samples', '3', '--output_dir', str(tmp_path / 'run')]
    statuses, errs = two_processes(command, timeout=300)
    assert statuses == [2, 2], errs[0][-2000:]
    assert '[4/4]' in errs[0]  # each process alone stayed within the limit, the two together did not
    assert re.search(r'skipped [45] unreadable training samples of imagenet together, more than '
                     r'max_unreadable_samples \(3\)', errs[0]), errs[0][-2000:]
    assert not (tmp_path / 'run' / 'checkpoint-last.pth').exists()  # the run ends before its first checkpoint
