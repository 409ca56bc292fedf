"""CIFAR10-DVS and DVS128 Gesture as event frames ``[T, 2, 128, 128]`` in spikingjelly's folder layout
(``download/``, ``extract/``, ``events_np/``, ``frames_number_<T>_split_by_number/``), with the authors'
splits. docs/datasets.md describes the layout, the splits and what is made from what.

spikingjelly (0.0.0.0.14 and 2.0.0 alike) lists the frames folder and reads its files. The rest is done
here, for its failure modes:

- CIFAR10-DVS's original files are converted to events_np/ here (same decoding, same files). 0.0.0.0.14
  reads them with numpy's binary ``fromstring``, removed in numpy 2.4, and its conversion threads drop
  their exceptions, leaving class folders short of files; 2.0.0 fixed both, but its error does not name
  the file and leaves ``events_np.building``, which stops every later run until it is deleted by hand.
- Frames are integrated here, with spikingjelly's integration function, each file written under a
  temporary name and then renamed. 0.0.0.0.14's integration threads drop their exceptions; 2.0.0's raise
  them without the file's name and leave a ``.building`` marker. Events files are opened one at a time
  (see read_events).
- The original files are checked against spikingjelly's MD5 sums before it sees them: both versions
  delete a file whose sum differs.
- A file that cannot be read is named in an UnreadableSampleError, with the file or folder whose deletion
  lets the next run make it again.
"""
import contextlib
import importlib
import io
import logging
import math
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from spikingjelly import configure as spikingjelly_configure
from spikingjelly.datasets import integrate_events_by_fixed_frames_number, np_savez
from torch.utils.data import Dataset
from torchvision.datasets.utils import check_integrity, extract_archive

from ..config import ConfigError
from .augment import EventAugment
from .errors import DatasetError, UnreadableSampleError

_logger = logging.getLogger(__name__)

SENSOR_SIZE = 128  # both sensors are 128 x 128; spikingjelly hard-codes it
TRAIN_RATIO = 0.9  # CIFAR10-DVS: share of each class used for training
EVENT_ARRAYS = ('t', 'x', 'y', 'p')
_NPZ_READ_LOCK = threading.Lock()


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


@dataclass(frozen=True)
class FrameFiles:
    """Where a frame dataset's files are, for the advice of its errors."""
    title: str
    events: Path  # events_np/
    frames: Path  # frames_number_<T>_split_by_number/

    def unreadable_frames(self, path, exc):
        events_file = self.events / Path(path).relative_to(self.frames)
        return UnreadableSampleError(
            f'{path} cannot be read ({type(exc).__name__}: {exc}); it is a {self.title} frames file, a partial or '
            f'damaged one. Delete it (or the whole {self.frames}): the next run integrates it again from '
            f'{events_file}', path=path)


class EventFrames(Dataset):
    """The samples ``indices`` of a spikingjelly frame dataset as float32 tensors ``[T, 2, H, W]``,
    passed through ``transform`` when one is given."""

    def __init__(self, base, indices, files, transform=None):
        self.base = base
        self.indices = list(indices)
        self.files = files
        self.transform = transform
        self.classes = base.classes
        self.samples = [base.samples[i] for i in self.indices]
        self.targets = [target for _, target in self.samples]

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, index):
        try:
            frames, target = self.base[self.indices[index]]
        except Exception as exc:  # whatever numpy raises for a truncated or foreign file
            raise self.files.unreadable_frames(self.samples[index][0], exc) from None
        frames = torch.from_numpy(frames)
        if self.transform is not None:
            frames = self.transform(frames)
        return frames, target


def build_event_datasets(cfg, name, training=True):
    """``(train, eval)`` for ``name`` (a key of EVENT_DATASETS); ``train`` is None when ``training`` is False."""
    info = EVENT_DATASETS[name]
    frames_number = _frames_number(cfg)
    root = Path(cfg.data_dir).expanduser()
    with _main_process_first():
        bases = _frame_datasets(root, info, frames_number)
    classes = next(iter(bases.values())).classes
    if cfg.num_classes is not None and len(classes) > cfg.num_classes:
        raise DatasetError(f'{root} holds {len(classes)} classes but the model has {cfg.num_classes} outputs: '
                           'set num_classes (--num-classes)')
    if info.splits:
        train_base, train_indices = bases['train'], range(len(bases['train']))
        test_base, test_indices = bases['test'], range(len(bases['test']))
    else:
        train_base = test_base = bases['all']
        train_indices, test_indices = per_class_split(train_base.targets)
    files = FrameFiles(info.title, root / 'events_np', _frames_folder(root, frames_number))
    augment = EventAugment(hflip=cfg.hflip) if cfg.augment else None
    train = EventFrames(train_base, train_indices, files, augment) if training else None
    evaluation = EventFrames(test_base, test_indices, files)
    total = sum(len(base) for base in bases.values())
    _logger.info('%s: %d frames per sample from %s; %d training and %d test samples, %d classes', info.title,
                 frames_number, files.frames, len(train_indices), len(test_indices), len(classes))
    if total != info.full_size:
        _logger.warning('%s under %s has %d samples, the complete dataset %d: fine for a subset of your own; '
                        'otherwise an earlier conversion was interrupted, and deleting %s and %s rebuilds them',
                        info.title, root, total, info.full_size, root / 'events_np', _frames_folder(root, '*'))
    return train, evaluation


def _frames_number(cfg):
    frames = cfg.time_step
    if frames is None or frames < 1:
        raise ConfigError('set the number of frames per sample T: time_step in the YAML file or --T')
    if cfg.img_size not in (None, SENSOR_SIZE):
        raise ConfigError(f'img_size must be {SENSOR_SIZE} for event data (spikingjelly integrates the events on '
                          f'the {SENSOR_SIZE}x{SENSOR_SIZE} sensor grid), got {cfg.img_size}')
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
    """spikingjelly's frame datasets by split (``all`` for CIFAR10-DVS), after making what they are
    built from: events_np/ when absent, then the frames events_np/ has and the frames folder lacks."""
    if not root.is_dir():
        raise DatasetError(_not_found(root, info, f'{root} does not exist'))
    _check_unfinished(root, frames_number)
    if (root / 'events_np').is_dir():
        _check_events(root, info)
    else:
        _make_events(root, info)
    _integrate_missing(root, info, frames_number)
    options = dict(data_type='frame', frames_number=frames_number, split_by='number')
    splits = {split: {'train': split == 'train'} for split in info.splits} or {'all': {}}
    captured = io.StringIO()  # spikingjelly 0.0.0.0.14 prints a line per folder
    try:
        with contextlib.redirect_stdout(captured):
            return {split: info.spikingjelly_class()(str(root), **options, **train) for split, train in splits.items()}
    except (OSError, NotImplementedError) as exc:
        raise DatasetError(f'spikingjelly could not read {info.title} under {root}: {exc}') from None
    finally:
        if captured.getvalue():
            _logger.debug('spikingjelly: %s', captured.getvalue().rstrip())


def _check_unfinished(root, frames_number):
    """spikingjelly 2 marks a folder it is making with ``<folder>.building``; when making it fails, the
    marker stays and spikingjelly refuses every later run. events_np/ is made from extract/, which
    spikingjelly uses unchecked when it is there, so that goes too."""
    for folder, source in ((root / 'events_np', root / 'extract'), (_frames_folder(root, frames_number), None)):
        marker = folder.with_name(f'{folder.name}.building')
        if marker.exists():
            delete = [str(path) for path in (marker, folder, source) if path is not None and path.exists()]
            raise DatasetError(f"{marker} marks an unfinished conversion by spikingjelly: delete {', '.join(delete)}; "
                               'the next run makes them again')


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


def _make_events(root, info):
    """events_np/ from the original files: CIFAR10-DVS's here (from extract/ when it is there, else from
    the checked download/), DVS128 Gesture's by spikingjelly (from the checked download/)."""
    if not (info.converts_here and (root / 'extract').is_dir()):
        _check_downloads(root, info, info.spikingjelly_class().resource_url_md5())
    if info.converts_here:
        _convert_cifar10_dvs(root)
    else:
        _spikingjelly_converts(root, info)
    _check_events(root, info)


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


def _spikingjelly_converts(root, info):
    events = root / 'events_np'
    _logger.info('%s: spikingjelly extracts and converts the files in %s to %s (once; this takes a while)',
                 info.title, root / 'download', events)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            info.spikingjelly_class()(str(root), data_type='event', **({'train': True} if info.splits else {}))
    except Exception as exc:  # spikingjelly 2 passes on whatever its readers raise, without the file's name
        made = [str(path) for path in (root / 'extract', events, root / 'events_np.building') if path.exists()]
        raise DatasetError(f"spikingjelly could not convert the files in {root / 'download'} ({type(exc).__name__}: "
                           f"{exc}). Delete what it made of them ({', '.join(made) or 'nothing yet'}) and run again; "
                           'if that fails the same way, download them again') from None
    finally:
        if captured.getvalue():
            _logger.debug('spikingjelly: %s', captured.getvalue().rstrip())


def _convert_cifar10_dvs(root):
    """extract/ from download/ (when absent), then events_np/ from extract/; each is written under a
    temporary name and renamed when complete."""
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
            events_of_file = read_cifar10_dvs_events(path)
        except (DatasetError, OSError) as exc:
            raise DatasetError(f'{exc}. Delete {extract} to have it extracted again from {root / "download"} '
                               '(and download that archive again if this recurs)') from None
        np_savez(partial / path.parent.name / f'{path.stem}.npz', **events_of_file)

    _run_in_threads(convert, files)
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


def _run_in_threads(function, items):
    """``function(item)`` for every item, on as many threads as spikingjelly uses for preprocessing; the
    first exception (in item order) cancels the items not started and is raised."""
    workers = max(1, min(os.cpu_count() or 1, spikingjelly_configure.max_threads_number_for_datasets_preprocess))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(function, item) for item in items]
        try:
            for future in futures:
                future.result()
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise


def read_events(path):
    """The t, x, y and p arrays of an events_np file. One thread at a time: numpy's parser of the arrays'
    headers (ast.literal_eval) has failed now and then when threads called it together on CPython 3.11.7,
    whichever spikingjelly is installed."""
    with _NPZ_READ_LOCK:
        archive = np.load(path)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError('a single array, not an .npz archive of arrays')
        with archive:
            missing = [name for name in EVENT_ARRAYS if name not in archive.files]
            if missing:
                raise ValueError(f"no {', '.join(missing)} array; it holds {', '.join(archive.files) or 'none'}")
            return {name: archive[name] for name in EVENT_ARRAYS}


def _missing_frames(events, frames):
    """Samples of events_np (paths relative to it) without a frames file."""
    expected = {path.relative_to(events) for path in events.rglob('*.npz')}
    present = {path.relative_to(frames) for path in frames.rglob('*.npz')} if frames.is_dir() else set()
    return sorted(expected - present)


def _integrate_missing(root, info, frames_number):
    """The frames of each events_np sample that has no frames file (all of them the first time), by
    spikingjelly's integration function; each file is written under a temporary name, then renamed, so
    that an interrupted run leaves only whole files."""
    events, frames = root / 'events_np', _frames_folder(root, frames_number)
    missing = _missing_frames(events, frames)
    if not missing:
        return
    height, width = info.spikingjelly_class().get_H_W()
    _logger.info('%s: integrating the events of %d samples into %d frames each under %s', info.title,
                 len(missing), frames_number, frames)
    start = time.perf_counter()

    def integrate(sample):
        try:
            stack = integrate_events_by_fixed_frames_number(read_events(events / sample), 'number', frames_number,
                                                            height, width)
        except Exception as exc:  # a truncated or foreign file, missing arrays, events off the sensor
            raise UnreadableSampleError(_unreadable_events(root, info, events / sample, exc),
                                        path=events / sample) from None
        target = frames / sample
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f'.{target.name}.partial')
        with open(partial, 'wb') as f:
            np_savez(f, frames=stack)
        partial.replace(target)

    _run_in_threads(integrate, missing)
    _logger.info('%s: frames ready after %.0f s', info.title, time.perf_counter() - start)


def _unreadable_events(root, info, path, exc):
    """The error message for an events_np file that cannot be used, with the way to rebuild it that the
    data folder allows: events_np/ is made from the original files, never from frames."""
    events, download = root / 'events_np', root / 'download'
    extracted = info.converts_here and any((root / 'extract').glob('*/*.aedat'))
    downloaded = all((download / name).is_file() for name, _, _ in info.spikingjelly_class().resource_url_md5())
    if extracted or downloaded:
        rebuild = (f'or delete {events}: the next run converts the original files in '
                   f"{root / 'extract' if extracted else download} again")
    else:
        rebuild = (f'or, to have the sample back, put the original files ({info.origin}) into {download}/ and delete '
                   f'{events}, so that the next run converts them again')
    return (f'{path} cannot be read ({type(exc).__name__}: {exc}); it is a {info.title} sample, in the events that '
            f'the frames are made from, and cannot be made from the frames. Delete it to go on without the sample, '
            f'{rebuild}')
