"""CIFAR10-DVS and DVS128 Gesture as event frames, read with spikingjelly's own dataset classes.

A sample is a float32 tensor ``[T, 2, 128, 128]``: spikingjelly (``data_type='frame',
frames_number=T, split_by='number'``) cuts the sample's events into T slices of equal event count
and counts, per pixel and polarity, the events of each slice. The data folder has spikingjelly's
layout::

    <root>/download/            the original files (read once, then no longer needed)
    <root>/extract/             the unpacked originals (made from download/)
    <root>/events_np/           one .npz of events (t, x, y, p) per sample (made from extract/):
                                  CIFAR10-DVS:    events_np/<class>/<sample>.npz
                                  DVS128 Gesture: events_np/train|test/<label>/<sample>.npz
    <root>/frames_number_<T>_split_by_number/   the integrated frames, same tree (made once per T)

Whatever is missing is made from the level above it, once; while events_np/ is missing, download/ must
hold the original files (as spikingjelly requires), else the error says where they come from. Nothing is
downloaded.

Splits: CIFAR10-DVS has none; as the authors do, the first 90% (rounded up) of each class's samples in
dataset order (spikingjelly's: class folders and file names sorted as strings) are the training set and
the rest the test set. DVS128 Gesture has its own train/test split. Labels are spikingjelly's: the
class folders' indices in string order (DVS128's folder ``10`` is label 2), as in the authors' runs.

Two departures from running spikingjelly 0.0.0.0.14 unattended, both about its failure modes:

- spikingjelly's reader of the original CIFAR10-DVS files uses the binary mode of ``numpy.fromstring``,
  which current numpy (2.4) has removed, and its conversion threads drop exceptions, leaving empty
  class folders. The conversion from extract/ to events_np/ is therefore done here (same decoding,
  same files); frames are still integrated by spikingjelly.
- The original files are checked against spikingjelly's MD5 sums before it sees them (it deletes a
  file whose sum differs), and the frames folder is checked against events_np/ afterwards (its
  integration threads drop exceptions too, and an interrupted run leaves a partial folder that later
  runs would trust).
"""
import contextlib
import importlib
import io
import logging
import math
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from spikingjelly.datasets import integrate_events_file_to_frames_file_by_fixed_frames_number
from torchvision.datasets.utils import check_integrity, extract_archive

from ..augment import EventAugment
from ..config import ConfigError
from .cifar import DatasetError

_logger = logging.getLogger(__name__)

SENSOR_SIZE = 128  # both sensors are 128 x 128; spikingjelly hard-codes it
TRAIN_RATIO = 0.9  # CIFAR10-DVS: share of each class used for training


@dataclass(frozen=True)
class EventDataset:
    title: str
    module: str  # submodule of spikingjelly.datasets
    class_name: str
    splits: tuple  # subfolders of events_np holding the official split; () for one pool
    full_size: int  # samples of the complete dataset, all splits together
    layout: str
    origin: str
    converts_here: bool  # events_np is made here, not by spikingjelly (see the module docstring)

    def spikingjelly_class(self):
        return getattr(importlib.import_module(f'spikingjelly.datasets.{self.module}'), self.class_name)


EVENT_DATASETS = {
    'cifar10-dvs': EventDataset(
        'CIFAR10-DVS', 'cifar10_dvs', 'CIFAR10DVS', (), 10000,
        'events_np/<class>/<sample>.npz, one folder per class (airplane ... truck)',
        'the ten per-class archives published on figshare', converts_here=True),
    'dvs128-gesture': EventDataset(
        'DVS128 Gesture', 'dvs128_gesture', 'DVS128Gesture', ('train', 'test'), 1176 + 288,
        'events_np/train/<label>/<sample>.npz and events_np/test/<label>/<sample>.npz, labels 0 ... 10',
        'IBM\'s release, which cannot be downloaded automatically (it is served through a web page)',
        converts_here=False),
}
# The authors' --dataset spellings and ours.
EVENT_DATASET_NAMES = {'cifar10-dvs': 'cifar10-dvs', 'cifar10dvs': 'cifar10-dvs', 'CIFAR10DVS': 'cifar10-dvs',
                       'dvs128-gesture': 'dvs128-gesture', 'dvs128gesture': 'dvs128-gesture',
                       'DVS128Gesture': 'dvs128-gesture'}


def per_class_split(targets, train_ratio=TRAIN_RATIO):
    """``(train, test)`` indices: of each class's samples in dataset order, the first
    ``ceil(count * train_ratio)`` train and the rest test; classes in increasing label order."""
    by_class = {}
    for index, target in enumerate(targets):
        by_class.setdefault(int(target), []).append(index)
    train, test = [], []
    for label in sorted(by_class):
        indices = by_class[label]
        cut = math.ceil(len(indices) * train_ratio)
        train.extend(indices[:cut])
        test.extend(indices[cut:])
    return train, test


class EventFrames(Dataset):
    """The samples ``indices`` of a spikingjelly frame dataset as float32 tensors ``[T, 2, H, W]``,
    passed through ``transform`` when one is given."""

    def __init__(self, base, indices, transform=None):
        self.base = base
        self.indices = list(indices)
        self.transform = transform
        self.classes = base.classes
        self.targets = [base.targets[i] for i in self.indices]

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, index):
        frames, target = self.base[self.indices[index]]
        frames = torch.from_numpy(frames)
        if self.transform is not None:
            frames = self.transform(frames)
        return frames, target


def build_event_datasets(args, name, training=True):
    """``(train, eval)`` for ``name`` (a key of EVENT_DATASETS); ``train`` is None when ``training`` is False."""
    info = EVENT_DATASETS[name]
    frames_number = _frames_number(args)
    root = Path(args.data_dir).expanduser()
    with _main_process_first():
        bases = _frame_datasets(root, info, frames_number)
    classes = next(iter(bases.values())).classes
    if args.num_classes is not None and len(classes) > args.num_classes:
        raise DatasetError(f'{root} holds {len(classes)} classes but the model has {args.num_classes} outputs: '
                           'set num_classes (--num-classes)')
    if info.splits:
        train_base, train_indices = bases['train'], range(len(bases['train']))
        test_base, test_indices = bases['test'], range(len(bases['test']))
    else:
        train_base = test_base = bases['all']
        train_indices, test_indices = per_class_split(train_base.targets)
    train = EventFrames(train_base, train_indices, EventAugment(hflip=args.hflip)) if training else None
    evaluation = EventFrames(test_base, test_indices)
    total = sum(len(base) for base in bases.values())
    _logger.info('%s: %d frames per sample from %s; %d training and %d test samples, %d classes', info.title,
                 frames_number, _frames_folder(root, frames_number), len(train_indices), len(test_indices),
                 len(classes))
    if total != info.full_size:
        _logger.warning('%s under %s has %d samples, the complete dataset %d: fine for a subset of your own; '
                        'otherwise an earlier conversion was interrupted, and deleting %s and %s rebuilds them',
                        info.title, root, total, info.full_size, root / 'events_np', _frames_folder(root, '*'))
    return train, evaluation


def _frames_number(args):
    frames = args.time_step
    if frames is None or frames < 1:
        raise ConfigError('set the number of frames per sample T: time_step in the YAML file or --T')
    if args.T_train is not None and args.T_train != frames:
        raise ConfigError(
            f'--T_train {args.T_train} with --T {frames}: the STB head (full_size_conv) has a kernel spanning exactly '
            f'T time steps, so the model cannot train on {args.T_train} frames and be evaluated on {frames} (the '
            f"authors' script fails the same way, inside the convolution). To train and evaluate on "
            f'{args.T_train} frames pass --T {args.T_train}')
    if args.img_size not in (None, SENSOR_SIZE):
        raise ConfigError(f'img_size must be {SENSOR_SIZE} for event data (spikingjelly integrates the events on '
                          f'the {SENSOR_SIZE}x{SENSOR_SIZE} sensor grid), got {args.img_size}')
    return frames


@contextlib.contextmanager
def _main_process_first():
    """Under torchrun, process 0 converts and integrates while the others wait, then read its files."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    main = not distributed or torch.distributed.get_rank() == 0
    if not main:
        torch.distributed.barrier()
    yield
    if distributed and main:
        torch.distributed.barrier()


def _frames_folder(root, frames_number):
    return root / f'frames_number_{frames_number}_split_by_number'


def _frame_datasets(root, info, frames_number):
    """spikingjelly's frame datasets by split (``all`` for CIFAR10-DVS), after making sure that what
    they are built from is there and complete."""
    if not root.is_dir():
        raise DatasetError(_not_found(root, info, f'{root} does not exist'))
    spikingjelly_class = info.spikingjelly_class()
    events = root / 'events_np'
    frames = _frames_folder(root, frames_number)
    if events.is_dir():
        _check_events(root, info)
    else:
        _check_downloads(root, info, spikingjelly_class.resource_url_md5())
        if info.converts_here:
            _convert_cifar10_dvs(root)
        else:
            _logger.info('%s: spikingjelly extracts and converts the files in %s to %s (once; this takes a while)',
                         info.title, root / 'download', events)
    integrate = not frames.is_dir()
    if integrate:
        _logger.info('%s: spikingjelly integrates the events into %d frames per sample under %s (once)', info.title,
                     frames_number, frames)
    else:
        _check_frames(events, frames)
    start = time.perf_counter()
    options = dict(data_type='frame', frames_number=frames_number, split_by='number')
    splits = {split: {'train': split == 'train'} for split in info.splits} or {'all': {}}
    captured = io.StringIO()  # spikingjelly prints a line per file
    try:
        with contextlib.redirect_stdout(captured):
            bases = {split: spikingjelly_class(str(root), **options, **train) for split, train in splits.items()}
            if integrate and _missing_frames(events, frames):
                # spikingjelly's integration threads drop their exceptions, and numpy's header parser
                # (ast.literal_eval) fails now and then when threads call it together on CPython 3.11.7:
                # integrate what is missing here, one file at a time, and list the files again.
                _integrate_one_by_one(spikingjelly_class, events, frames, frames_number)
                bases = {split: spikingjelly_class(str(root), **options, **train) for split, train in splits.items()}
    except (OSError, NotImplementedError) as exc:
        _check_frames(events, frames)
        raise DatasetError(f'spikingjelly could not read {info.title} under {root}: {exc}') from None
    finally:
        if captured.getvalue():
            _logger.debug('spikingjelly: %s', captured.getvalue().rstrip())
    _check_frames(events, frames)
    if integrate:
        _logger.info('%s: frames ready after %.0f s', info.title, time.perf_counter() - start)
    return bases


def _class_counts(folder):
    return {d.name: sum(1 for _ in d.glob('*.npz')) for d in sorted(folder.iterdir()) if d.is_dir()}


def _check_events(root, info):
    events = root / 'events_np'
    problems, classes = [], {}
    for split in info.splits or ('',):
        folder = events / split
        counts = _class_counts(folder) if folder.is_dir() else {}
        classes[split] = list(counts)
        empty = [name for name, count in counts.items() if count == 0]
        if not counts:
            problems.append(f'{folder} holds no class folders' if folder.is_dir() else f'{folder} is missing')
        elif empty:
            problems.append(f"{folder} has class folders without .npz files: {', '.join(empty)}")
    if not problems and info.splits and classes['train'] != classes['test']:
        problems.append(f"train/ and test/ hold different class folders ({', '.join(classes['train'])} and "
                        f"{', '.join(classes['test'])})")
    if problems:
        raise DatasetError(f"{'; '.join(problems)}. Expected {info.layout}. If an earlier conversion was interrupted, "
                           f"delete {events}: it is rebuilt from {root / 'download'}")


def _not_found(root, info, what):
    resources = info.spikingjelly_class().resource_url_md5()
    download = root / 'download'
    names_by_url = {}
    for name, url, _ in resources:
        names_by_url.setdefault(url, []).append(name)
    sources = '; '.join(f"{', '.join(names)} from {url}" for url, names in names_by_url.items())
    hints = []
    if root.is_dir():
        inside = {entry.name for entry in root.iterdir()}
        if inside & {name for name, _, _ in resources}:
            hints.append(f'{root} holds original files itself: move them into {download}/')
        if root.name == 'events_np' or any(entry.is_dir() and any(entry.glob('*.npz')) for entry in root.iterdir()):
            hints.append(f'{root} looks like an events_np folder: pass the folder that holds it')
    hint = ' ' + ' '.join(hints) if hints else ''
    return (f'{info.title} not found: {what}.{hint} Expected {root}/{info.layout} (spikingjelly\'s converted '
            f'events), or the original files in {download}/, which are converted once. They are {info.origin}: '
            f'{sources}. Pass the folder with --data-path')


def _check_downloads(root, info, resources):
    download = root / 'download'
    missing = [name for name, _, _ in resources if not (download / name).is_file()]
    if missing:
        what = (f"neither {root / 'events_np'} nor {download} exists" if not download.is_dir()
                else f"{root / 'events_np'} does not exist and {download} lacks {', '.join(missing)}")
        raise DatasetError(_not_found(root, info, what))
    _logger.info('%s: checking the MD5 sums of %d files in %s', info.title, len(resources), download)
    corrupt = [name for name, _, md5 in resources if not check_integrity(str(download / name), md5)]
    if corrupt:
        expected = ', '.join(f'{name} {md5}' for name, _, md5 in resources if name in corrupt)
        raise DatasetError(f'{download}: {", ".join(corrupt)} differ from the published files (MD5 expected: '
                           f'{expected}); a broken or partial download? Download them again')


def _convert_cifar10_dvs(root):
    """extract/ from download/ (when absent), then events_np/ from extract/; each is written under a
    temporary name and renamed when complete."""
    from spikingjelly import configure
    from spikingjelly.datasets import np_savez

    extract = root / 'extract'
    if not extract.is_dir():
        partial = root / 'extract.partial'
        shutil.rmtree(partial, ignore_errors=True)
        for archive in sorted((root / 'download').glob('*.zip')):
            _logger.info('CIFAR10-DVS: extracting %s', archive)
            extract_archive(str(archive), str(partial))
        partial.rename(extract)
    folders = sorted(path for path in extract.iterdir() if path.is_dir())
    files = [path for folder in folders for path in sorted(folder.glob('*.aedat'))]
    if not files:
        raise DatasetError(f'{extract} holds no <class>/*.aedat files; delete it to have it extracted again from '
                           f"{root / 'download'}")
    events = root / 'events_np'
    partial = root / 'events_np.partial'
    shutil.rmtree(partial, ignore_errors=True)
    for folder in {path.parent.name for path in files}:
        (partial / folder).mkdir(parents=True)
    _logger.info('CIFAR10-DVS: converting %d files from %s to %s', len(files), extract, events)

    def convert(path):
        try:
            np_savez(partial / path.parent.name / f'{path.stem}.npz', **read_cifar10_dvs_events(path))
        except DatasetError:
            raise
        except OSError as exc:
            raise DatasetError(f'converting {path}: {exc}') from None

    workers = max(1, min(os.cpu_count() or 1, configure.max_threads_number_for_datasets_preprocess))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(convert, path) for path in files]
        try:
            for future in futures:
                future.result()
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise
    partial.rename(events)


def read_cifar10_dvs_events(path):
    """The events of one original CIFAR10-DVS file (AER-DAT 2.0: '#' header lines, then big-endian
    32-bit address/timestamp pairs) as spikingjelly stores them: ``t``, ``x = 127 - row``,
    ``y = 127 - column`` and ``p = 1 - polarity``, where the address holds the polarity in bit 0, the
    column in bits 1-7 and the row in bits 8-14."""
    data = Path(path).read_bytes()
    body = data[_header_length(data):]
    if len(body) % 8:
        raise DatasetError(f'{path}: {len(body)} bytes of events, not a multiple of 8 (a truncated file?)')
    words = np.frombuffer(body, dtype='>u4').astype(np.uint32)
    address, timestamp = words[0::2], words[1::2]
    column = (address >> 1) & 0x7F
    row = (address >> 8) & 0x7F
    return {'t': timestamp, 'x': 127 - row, 'y': 127 - column, 'p': 1 - (address & 1).astype(np.int64)}


def _header_length(data):
    """Bytes taken by the leading text lines that start with '#' (after leading blanks)."""
    offset = 0
    while offset < len(data):
        end = data.find(b'\n', offset)
        line = data[offset:] if end < 0 else data[offset:end + 1]
        try:
            text = line.decode().strip()
        except UnicodeDecodeError:
            break
        if not text.startswith('#'):
            break
        offset += len(line)
    return offset


def _missing_frames(events, frames):
    """Samples of events_np (paths relative to it) without a frames file."""
    expected = {path.relative_to(events) for path in events.rglob('*.npz')} if events.is_dir() else set()
    present = {path.relative_to(frames) for path in frames.rglob('*.npz')} if frames.is_dir() else set()
    return sorted(expected - present)


def _integrate_one_by_one(spikingjelly_class, events, frames, frames_number):
    height, width = spikingjelly_class.get_H_W()
    for sample in _missing_frames(events, frames):
        integrate_events_file_to_frames_file_by_fixed_frames_number(
            spikingjelly_class.load_events_np, str(events / sample), str((frames / sample).parent), 'number',
            frames_number, height, width)


def _check_frames(events, frames):
    """Every sample of events_np has its frames file (spikingjelly's integration threads drop errors,
    and an interrupted run leaves a partial folder)."""
    missing = _missing_frames(events, frames)
    if missing:
        total = sum(1 for _ in events.rglob('*.npz'))
        raise DatasetError(f'{frames} holds the frames of {total - len(missing)} of the {total} '
                           f'samples in {events} (missing: {missing[0]}, ...): an earlier integration was interrupted '
                           f'or failed. Delete {frames}; the next run integrates the events again')
