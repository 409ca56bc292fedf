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
  (see sglformer.data.event_files.read_events).
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
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision.datasets.utils import check_integrity

from ..config import ConfigError
from ..distributed import main_process_first
from .augment import EventAugment
from .errors import DatasetError, UnreadableSampleError
from .event_files import convert_cifar10_dvs, integrate_missing

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
    with main_process_first():
        bases = _frame_datasets(root, info, frames_number)
    classes = next(iter(bases.values())).classes
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
    integrate_missing(root, info, _frames_folder(root, frames_number), frames_number)
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
        convert_cifar10_dvs(root)
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
