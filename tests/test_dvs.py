"""CIFAR10-DVS and DVS128 Gesture: spikingjelly's frames from synthetic event files, the authors' split,
the augmentation, and the training scripts end to end (dvs checkpoint layout, exact resume, --test-only)."""
import argparse
import json
import math
import shutil
from unittest import mock

import numpy as np
import pytest
import torch
from spikingjelly.datasets import cifar10_dvs

from conftest import FOLDER_MODELS, REPO_ROOT, assert_resumed_equals_straight, crash_at_epoch
from conftest import train_script as train
from sglformer.checkpoint import read_checkpoint
from sglformer.config import parse_args
from sglformer.data import augment, build_datasets
from sglformer.data.augment import OPERATIONS, EventAugment, apply_operation
from sglformer.data.dvs import per_class_split
from sglformer.data.event_files import read_cifar10_dvs_events
from sglformer.run_folder import run_folder_path
from sglformer.testing import events_of, write_cifar10_dvs_archives, write_events_np

MODEL = ['--dim', '48', '--num-heads', '4', '--T', '2', '-b', '2', '-j', '0', '--img-size', '128', '--device', 'cpu']
SMALL = [*MODEL, '--warmup-epochs', '0', '--cooldown-epochs', '0']  # training; evaluations take MODEL
CIFAR_CLASSES = {'airplane': 11, 'cat': 12}  # 90% rounded up: 10 + 11 training samples, 1 + 1 test samples
GESTURE_TRAIN = {'0': 2, '10': 2, '2': 2}  # class folders sort as strings: '10' is label 1
GESTURE_TEST = {'0': 1, '10': 1, '2': 1}


@pytest.fixture(scope='module')
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp('events')
    write_events_np(base / 'cifar10dvs' / 'events_np', CIFAR_CLASSES, 'cifar10')
    write_events_np(base / 'gesture' / 'events_np' / 'train', GESTURE_TRAIN, 'user01')
    write_events_np(base / 'gesture' / 'events_np' / 'test', GESTURE_TEST, 'user24')
    return {'cifar10-dvs': base / 'cifar10dvs', 'dvs128-gesture': base / 'gesture'}


def args_for(folder, root, *flags):
    return parse_args(['--data-path', str(root), *SMALL, *flags], REPO_ROOT / folder / f'{folder}.yml')


def test_per_class_split_takes_the_first_90_percent_rounded_up():
    sizes = {0: 11, 1: 12, 2: 20, 3: 1000, 4: 5}
    targets = [label for i in range(1000) for label, size in sizes.items() if i < size]  # classes interleaved
    train_idx, test_idx = per_class_split(targets)
    train_counts = {label: sum(targets[i] == label for i in train_idx) for label in sizes}
    assert train_counts == {0: 10, 1: 11, 2: 18, 3: 900, 4: 5}
    assert sorted(train_idx + test_idx) == list(range(len(targets)))
    for label in sizes:  # in dataset order: a class's training samples all come before its test samples
        own = [i for i, t in enumerate(targets) if t == label]
        assert [i for i in train_idx if targets[i] == label] == own[:train_counts[label]]


def test_cifar10_dvs_frames_and_split(roots):
    train_set, test_set = build_datasets(args_for('cifar10-dvs', roots['cifar10-dvs']))
    assert (len(train_set), len(test_set)) == (21, 2) and train_set.classes == ['airplane', 'cat']
    # dataset order sorts file names as strings, so the last of each class is sample 9, not 10 or 11
    names = [test_set.base.samples[i][0].rsplit('/', 1)[1] for i in test_set.indices]
    assert names == ['cifar10_airplane_9.npz', 'cifar10_cat_9.npz'] and test_set.targets == [0, 1]
    frames, label = test_set[1]
    events = events_of('cifar10_cat_9', 29)
    assert frames.shape == (2, 2, 128, 128) and frames.dtype == torch.float32 and label == 1
    assert frames[0].sum() == 14 and frames[1].sum() == 15  # split by number: 29 events -> 14 + 15
    assert frames[:, 1].sum() == events['p'].sum()  # channel 1 counts the ON events
    first = {key: int(values[0]) for key, values in events.items()}  # lands in frame 0, channel p, row y, column x
    assert frames[0, first['p'], first['y'], first['x']] >= 1
    assert train_set[0][0].shape == (2, 2, 128, 128)


def test_dvs128_keeps_its_own_split_and_spikingjelly_labels(roots):
    train_set, test_set = build_datasets(args_for('dvs128-gesture', roots['dvs128-gesture']))
    assert (len(train_set), len(test_set)) == (6, 3)
    assert test_set.classes == ['0', '10', '2'] and test_set.targets == [0, 1, 2]
    assert all('/test/' in test_set.base.samples[i][0] for i in test_set.indices)
    no_train, eval_only = build_datasets(args_for('dvs128-gesture', roots['dvs128-gesture']), training=False)
    assert no_train is None and torch.equal(eval_only[2][0], test_set[2][0])


def test_augment_keeps_shape_and_dtype_and_repeats_under_a_seed():
    frames = torch.randint(0, 3, (3, 2, 32, 32)).float()
    aug = EventAugment()

    def draws(seed):
        torch.manual_seed(seed)
        return [aug(frames.clone()) for _ in range(30)]

    first, again, other = draws(0), draws(0), draws(1)
    assert all(out.shape == frames.shape and out.dtype == torch.float32 for out in first)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    assert any(not torch.equal(out, frames) for out in first)


def test_augment_draws_the_authors_operations_and_magnitudes():
    calls = []
    torch.manual_seed(0)
    with mock.patch.object(augment, 'apply_operation', side_effect=lambda f, op, m: calls.append((op, m)) or f):
        aug = EventAugment()
        for _ in range(600):
            aug(torch.zeros(1, 2, 8, 8))
    drawn = {op for op, _ in calls}
    assert drawn == set(OPERATIONS) - {'cutout'} and 60 < 600 - len(calls) < 140  # cutout: about 1 in 6
    limits = {'shear_x': 0.3, 'translate_x': 5.0, 'translate_y': 5.0, 'rotate': 30.0, 'identity': 0.0}
    for op, magnitude in calls:
        bins = np.linspace(-limits[op], limits[op], 31)
        assert np.isclose(np.abs(bins), abs(magnitude), atol=1e-6).any(), (op, magnitude)
    assert any(m < 0 for op, m in calls if op == 'rotate') and any(m > 0 for op, m in calls if op == 'rotate')


def test_augment_operations_on_frames():
    frames = torch.zeros(3, 2, 16, 16)
    frames[:, :, 4, 6] = 1
    assert apply_operation(frames, 'identity') is frames
    assert apply_operation(frames, 'translate_x', 5.0)[:, :, 4, 11].eq(1).all()
    assert apply_operation(frames, 'translate_x', -4.67)[:, :, 4, 2].eq(1).all()  # truncated to 4 pixels
    assert apply_operation(frames, 'translate_y', 3.2)[:, :, 7, 6].eq(1).all()
    for operation in ('shear_x', 'rotate'):
        assert torch.equal(apply_operation(frames, operation, 0.0), frames)
        moved = apply_operation(frames, operation, 0.3 if operation == 'shear_x' else 30.0)
        assert moved.sum() == frames.sum() and not torch.equal(moved, frames)
        assert all(torch.equal(moved[t], moved[0]) for t in range(3))  # every frame moves the same way
    with pytest.raises(ValueError, match='unknown operation'):
        apply_operation(frames, 'cutout')


def test_flip_mirrors_every_frame_before_the_operation():
    frames = torch.rand(3, 2, 8, 8)
    with mock.patch.object(augment, 'apply_operation', side_effect=lambda f, op, m: f):
        for hflip, expected in ((1.0, frames.flip(-1)), (0.0, frames)):
            aug = EventAugment(hflip=hflip)
            aug.cutout = lambda f: f
            assert all(torch.equal(aug(frames), expected) for _ in range(10))


def test_cutout_erases_one_square_in_every_frame():
    ones = torch.ones(4, 2, 64, 64)
    torch.manual_seed(3)
    for _ in range(20):
        erased = EventAugment(hflip=0.0).cutout(ones.clone())
        holes = erased.eq(0)
        assert all(torch.equal(holes[t, c], holes[0, 0]) for t in range(4) for c in range(2))
        rows, cols = holes[0, 0].any(1).sum().item(), holes[0, 0].any(0).sum().item()
        assert rows == cols and holes[0, 0].sum() == rows * cols
        assert round(math.sqrt(0.001 * 64 * 64)) <= rows <= round(math.sqrt(0.11 * 64 * 64))


@pytest.mark.parametrize('folder', ['cifar10-dvs', 'dvs128-gesture'])
def test_yaml_holds_the_recipe_and_the_authors_flags_work(folder):
    config = REPO_ROOT / folder / f'{folder}.yml'
    args = parse_args([], config)
    recipe = dict(time_step=16, lr=5e-3, batch_size=16, opt='adamw', opt_eps=1e-8, weight_decay=0.06,
                  sched='cosine', warmup_epochs=10, warmup_lr=1e-5, min_lr=1e-5, cooldown_epochs=10, smoothing=0.1,
                  mixup=0.5, cutmix=0.0, mixup_prob=0.5, mixup_switch_prob=0.5, mixup_mode='batch', mixup_off_epoch=75,
                  amp=True, seed=2021, checkpoint_format='dvs', output='logs', img_size=128, dim=256, num_heads=16,
                  layer=1, mlp_ratio=4.0, epochs=96 if folder == 'cifar10-dvs' else 192,
                  num_classes=10 if folder == 'cifar10-dvs' else 11)
    assert {key: getattr(args, key) for key in recipe} == recipe
    args = parse_args(['--T=16', '--lr=1e-3', '-b', '8', '--epochs', '3', '--data-path', '/d', '--output-dir', 'o',
                       '--resume', 'r.pth', '--T_train', '16', '--mixup', '0.2', '--cutmix', '1.0',
                       '--smoothing', '0.2', '--no-amp', '-j', '2', '--device', 'cpu', '--dim', '64',
                       '--num-heads', '8', '--layer', '2', '--mlp-ratio', '2'], config)
    assert (args.time_step, args.lr, args.batch_size, args.epochs, args.data_dir, args.output, args.resume) == (
        16, 1e-3, 8, 3, '/d', 'o', 'r.pth')
    assert (args.T_train, args.mixup, args.cutmix, args.smoothing, args.amp, args.workers) == (16, 0.2, 1.0, 0.2, False, 2)
    assert parse_args(['--test-only'], config).eval is True
    assert (args.device, args.dim, args.num_heads, args.layer, args.mlp_ratio) == ('cpu', 64, 8, 2, 2.0)
    assert parse_args(['--T-train', '4', '--amp', '--eval'], config).T_train == 4
    assert parse_args([], config).time_step == 16  # the authors' default when --T is not given
    name = run_folder_path(parse_args(['--T', '10'], config))
    assert name.as_posix() == f'logs/{FOLDER_MODELS[folder]}_b16_T10_wd0.06_adamw/lr0.005'


@pytest.fixture(scope='module')
def gesture_run(tmp_path_factory, roots):
    out = tmp_path_factory.mktemp('runs')
    train('dvs128-gesture', '--data-path', str(roots['dvs128-gesture']), *SMALL, '--epochs', '2',
          '--output-dir', str(out), '--experiment', 'straight')
    return out


def test_short_run_writes_the_authors_files(gesture_run):
    run = gesture_run / 'straight'
    names = {p.name for p in run.iterdir()}
    assert {'args.yaml', 'summary.csv', 'log.txt', 'checkpoint_latest.pth', 'checkpoint_1.pth'} <= names
    assert read_checkpoint(run / 'checkpoint_1.pth')['epoch'] == 1  # the authors' final checkpoint
    assert not any(n.endswith('.tmp') for n in names)
    last = read_checkpoint(run / 'checkpoint_latest.pth')
    assert set(last) == {'model', 'optimizer', 'lr_scheduler', 'epoch', 'args', 'max_test_acc1',
                         'test_acc5_at_max_test_acc1'}
    assert last['epoch'] == 1 and isinstance(last['args'], argparse.Namespace) and last['args'].time_step == 2
    assert last['model']['head.weight'].shape == (11, 48)
    assert last['model']['full_size_conv.weight'].shape == (48, 1, 64, 2)  # 8x8 tokens, T = 2
    top1 = [float(row.split(',')[3]) for row in (run / 'summary.csv').read_text().splitlines()[1:]]
    assert last['max_test_acc1'] == pytest.approx(max(top1), abs=1e-4)
    if max(top1) > 0:  # the authors' script writes it on a strict improvement over 0
        assert read_checkpoint(run / 'checkpoint_max_test_acc1.pth')['max_test_acc1'] == last['max_test_acc1']
    rows = (run / 'summary.csv').read_text().splitlines()
    assert [r.split(',')[0] for r in rows[1:]] == ['0', '1']


def test_resume_equals_uninterrupted(gesture_run, roots):
    common = ['--data-path', str(roots['dvs128-gesture']), *SMALL, '--epochs', '2', '--output-dir', str(gesture_run)]
    with crash_at_epoch(1):
        train('dvs128-gesture', *common, '--experiment', 'stopped')
    stopped = gesture_run / 'stopped' / 'checkpoint_latest.pth'
    assert read_checkpoint(stopped)['epoch'] == 0
    train('dvs128-gesture', *common, '--resume', str(stopped))

    straight = read_checkpoint(gesture_run / 'straight' / 'checkpoint_latest.pth')
    resumed = read_checkpoint(stopped)
    assert resumed['epoch'] == 1
    assert_resumed_equals_straight(resumed, straight, weights='model')
    assert resumed['max_test_acc1'] == straight['max_test_acc1']


def test_test_only_on_the_authors_ddp_checkpoint(gesture_run, roots, tmp_path, capsys):
    """The authors' DVS container: argparse args, lr_scheduler state, DDP's module. prefix."""
    ours = read_checkpoint(gesture_run / 'straight' / 'checkpoint_latest.pth')
    authors = {'model': {'module.' + k: v for k, v in ours['model'].items()}, 'optimizer': ours['optimizer'],
               'lr_scheduler': ours['lr_scheduler'], 'epoch': 191, 'max_test_acc1': 98.6,
               'test_acc5_at_max_test_acc1': 100.0,
               'args': argparse.Namespace(model='sglformer', T=2, lr=5e-3, test_only=False)}
    torch.save(authors, tmp_path / 'checkpoint_max_test_acc1.pth')
    capsys.readouterr()
    metrics = train('dvs128-gesture', '--data-path', str(roots['dvs128-gesture']), *MODEL, '--test-only', '--resume',
                    str(tmp_path / 'checkpoint_max_test_acc1.pth'), '--output-dir', str(tmp_path), '--experiment', 'ev')
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert last_line == f"* Acc@1 {metrics['top1']:.3f} Acc@5 {metrics['top5']:.3f} loss {metrics['loss']:.4f}"
    saved = json.loads((tmp_path / 'ev' / 'eval.json').read_text())
    assert saved['images'] == 3 and saved['top1'] == metrics['top1']
    again = train('dvs128-gesture', '--data-path', str(roots['dvs128-gesture']), *MODEL, '--eval', '--resume',
                  str(gesture_run / 'straight' / 'checkpoint_latest.pth'), '--output-dir', str(tmp_path))
    assert again == metrics


def test_cifar10_dvs_trains_one_epoch(roots, tmp_path):
    best = train('cifar10-dvs', '--data-path', str(roots['cifar10-dvs']), *SMALL, '--epochs', '1', '-b', '10',
                 '--output-dir', str(tmp_path))
    run = tmp_path / 'sglformer_cifar10dvs_b10_T2_wd0.06_adamw' / 'lr0.005'
    assert read_checkpoint(run / 'checkpoint_0.pth')['max_test_acc1'] == best['top1']


def run_expecting_error(capsys, folder, *flags):
    with pytest.raises(SystemExit) as exit_info:
        train(folder, *SMALL, '--epochs', '1', *flags)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_missing_or_empty_root_says_where_the_files_come_from(tmp_path, capsys):
    err = run_expecting_error(capsys, 'cifar10-dvs', '--data-path', str(tmp_path / 'none'))
    assert 'does not exist' in err and 'airplane.zip' in err and 'figshare' in err and 'events_np' in err
    err = run_expecting_error(capsys, 'cifar10-dvs', '--data-path', str(tmp_path))
    assert f"{tmp_path / 'download'}/" in err and 'truck.zip from https://' in err
    err = run_expecting_error(capsys, 'dvs128-gesture', '--data-path', str(tmp_path))
    assert 'cannot be downloaded automatically' in err and 'DvsGesture.tar.gz' in err
    assert 'events_np/train/<label>' in err


def test_wrong_root_gets_a_hint(roots, capsys):
    err = run_expecting_error(capsys, 'cifar10-dvs', '--data-path', str(roots['cifar10-dvs'] / 'events_np'))
    assert 'looks like an events_np folder: pass the folder that holds it' in err
    err = run_expecting_error(capsys, 'dvs128-gesture', '--data-path', str(roots['cifar10-dvs']))
    assert f"{roots['cifar10-dvs'] / 'events_np' / 'train'} is missing" in err


def test_dvs128_splits_with_other_classes_are_an_error(tmp_path, capsys):
    write_events_np(tmp_path / 'events_np' / 'train', {'0': 1, '1': 1}, 'user01')
    write_events_np(tmp_path / 'events_np' / 'test', {'0': 1}, 'user24')
    err = run_expecting_error(capsys, 'dvs128-gesture', '--data-path', str(tmp_path))
    assert 'train/ and test/ hold different class folders (0, 1 and 0)' in err


def test_events_files_are_read_one_thread_at_a_time(roots, tmp_path, monkeypatch):
    """numpy's header parser has failed when integration threads called it together (CPython 3.11.7)."""
    from sglformer.data import event_files
    real_load, overlaps, inside = np.load, [], []

    def load(*args, **kwargs):
        overlaps.append(len(inside))
        inside.append(1)
        try:
            return real_load(*args, **kwargs)
        finally:
            inside.pop()

    monkeypatch.setattr(event_files.np, 'load', load)
    root = tmp_path / 'copy'
    shutil.copytree(roots['cifar10-dvs'] / 'events_np', root / 'events_np')
    build_datasets(args_for('cifar10-dvs', root))
    assert len(overlaps) >= 23 and not any(overlaps)


def test_corrupt_download_is_reported_and_kept(tmp_path, capsys):
    download = tmp_path / 'download'
    download.mkdir()
    for name in ('DvsGesture.tar.gz', 'gesture_mapping.csv', 'LICENSE.txt', 'README.txt'):
        (download / name).write_text('not the published file')
    err = run_expecting_error(capsys, 'dvs128-gesture', '--data-path', str(tmp_path))
    assert 'differ from the published files' in err and 'DvsGesture.tar.gz' in err
    assert (download / 'DvsGesture.tar.gz').read_text() == 'not the published file'


def test_bad_frame_options(roots, capsys):
    err = run_expecting_error(capsys, 'cifar10-dvs', '--data-path', str(roots['cifar10-dvs']), '--T_train', '1')
    assert "'T_train' 1 with T 2" in err and 'STB head' in err  # checked with the options
    err = run_expecting_error(capsys, 'cifar10-dvs', '--data-path', str(roots['cifar10-dvs']), '--img-size', '64')
    assert 'img_size must be 128' in err
    train_set, _ = build_datasets(args_for('cifar10-dvs', roots['cifar10-dvs'], '--T_train', '2', '--dataset',
                                           'cifar10dvs'))  # the authors' dataset name
    assert len(train_set) == 21


class NumpyWithBinaryFromstring:
    """numpy with the binary ``fromstring`` that spikingjelly 0.0.0.0.14's CIFAR10-DVS reader needs (numpy 2.4
    removed it; spikingjelly 2 reads with ``frombuffer``)."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def fromstring(data, dtype):
        return np.frombuffer(data, dtype=dtype)


def test_cifar10_dvs_from_the_original_archives(tmp_path, monkeypatch):
    root = tmp_path / 'CIFAR10DVS'
    resources = write_cifar10_dvs_archives(root / 'download', CIFAR_CLASSES)
    monkeypatch.setattr(cifar10_dvs.CIFAR10DVS, 'resource_url_md5', staticmethod(lambda: resources))
    train_set, test_set = build_datasets(args_for('cifar10-dvs', root))
    assert (len(train_set), len(test_set)) == (21, 2)
    made = sorted(p.name for p in root.iterdir())
    assert made == ['download', 'events_np', 'extract', 'frames_number_2_split_by_number']

    source = root / 'extract' / 'cat' / 'cifar10_cat_5.aedat'
    ours = read_cifar10_dvs_events(source)
    monkeypatch.setattr(cifar10_dvs, 'np', NumpyWithBinaryFromstring())
    spikingjelly_reader = getattr(cifar10_dvs.CIFAR10DVS, 'load_origin_data', None) or cifar10_dvs._load_origin_data
    theirs = spikingjelly_reader(str(source))
    for key in 't', 'x', 'y', 'p':
        assert np.array_equal(ours[key], theirs[key]), key
    stored = np.load(root / 'events_np' / 'cat' / 'cifar10_cat_5.npz')
    assert all(np.array_equal(stored[key], ours[key]) for key in 'txyp')
