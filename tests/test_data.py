"""The data layer's handling of files that cannot be read (errors naming the file, advice that works,
the bounded skipping of training samples), and frames, splits and augmentation pinned to fixed values,
so that the spikingjelly 0.0.0.0.14 and 2.0.0 stacks are held to the same ones."""
import hashlib
import logging
import shutil
import traceback
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from spikingjelly.datasets import cifar10_dvs
from torch.utils.data import DataLoader, Dataset

from conftest import REPO_ROOT
from sglformer.config import parse_args
from sglformer.data import DatasetError, UnreadableSampleError, build_datasets, build_eval_batches, build_train_batches
from sglformer.data.augment import EventAugment
from sglformer.data.unreadable import SkipUnreadable
from sglformer.testing import (events_of, truncate_file, write_cifar10_dvs_archives, write_events_file, write_events_np,
                               write_image_folder)

ONE_PROCESS = SimpleNamespace(rank=0, world_size=1)
CPU = torch.device('cpu')
CIFAR_CLASSES = {'airplane': 11, 'cat': 12}  # 90% rounded up: 10 + 11 training samples, 1 + 1 test samples
WNIDS = ('n01440764', 'n01443537')
BROKEN_IMAGE = 'train/n01443537/n01443537_2.JPEG'


def dvs_args(root, frames=2, folder='cifar10-dvs', workers=0):
    return parse_args(['--data-path', str(root), '--T', str(frames), '-j', str(workers), '--no-pin-mem'],
                      REPO_ROOT / folder / f'{folder}.yml')


def imagenet_args(root, workers):
    return parse_args(['--data_path', str(root), '--input_size', '16', '--nb_classes', '2', '--num_workers',
                       str(workers), '--no-pin_mem', '--batch_size', '4'], REPO_ROOT / 'imagenet' / 'imagenet.yml')


def cifar10_dvs_events(root):
    write_events_np(root / 'events_np', CIFAR_CLASSES, 'cifar10')
    return root


def loader_error(batches):
    """The message of the UnreadableSampleError that iterating ``batches`` raises. The traceback's frames
    are cleared at once: they hold the DataLoader iterator in a reference cycle, and an iterator left to
    the cycle collector waits 5 s per worker process for its workers to stop."""
    with pytest.raises(UnreadableSampleError) as error:
        for _ in batches:
            pass
    traceback.clear_frames(error.tb)
    return str(error.value)


def digest(arrays):
    return hashlib.sha256(b''.join(np.ascontiguousarray(a).tobytes() for a in arrays)).hexdigest()[:16]


# --- ImageFolder -------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def images(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp('images'), WNIDS, {'train': 4, 'val': 2}, size=(16, 16),
                              truncated=(BROKEN_IMAGE,))


@pytest.mark.parametrize('workers', [0, 2])
def test_truncated_jpeg_is_named_by_the_train_loader(images, workers):
    train_set, val_set = build_datasets(imagenet_args(images, workers))
    message = loader_error(build_train_batches(imagenet_args(images, workers), train_set, ONE_PROCESS, CPU, 2)
                           .epoch(0, seed=0))
    assert message.startswith(f'{images / BROKEN_IMAGE} cannot be read as an image (OSError: ')
    assert (f"); it is an image of {images / 'train'}, a partial or damaged copy. Copy it again from the original "
            'archive, or delete it: the next run goes on without it') in message
    assert message.endswith('set it to N to skip up to N of them (each is replaced by the next readable sample)')
    assert 'Traceback' not in message and 'Caught' not in message  # the worker's traceback is not part of it
    evaluation = build_eval_batches(imagenet_args(images, workers), val_set, ONE_PROCESS, CPU, 4)
    assert sum(len(targets) for _, targets in evaluation.epoch()) == 4


def test_deleting_the_truncated_jpeg_lets_the_run_go_on(images, tmp_path):
    root = tmp_path / 'copy'
    shutil.copytree(images, root)
    (root / BROKEN_IMAGE).unlink()
    train_set, _ = build_datasets(imagenet_args(root, 0))
    assert len(train_set) == 7 and [len(targets) for _, targets in build_train_batches(
        imagenet_args(root, 0), train_set, ONE_PROCESS, CPU, 2).epoch(0, seed=0)] == [4]


# --- event data: events_np and frames files ------------------------------------------------------------

def test_events_file_without_p_is_named_and_deleting_it_lets_the_run_go_on(tmp_path):
    root = cifar10_dvs_events(tmp_path / 'dvs')
    broken = root / 'events_np' / 'cat' / 'cifar10_cat_3.npz'
    write_events_file(broken, events_of('cifar10_cat_3', 23), omit=('p',))
    with pytest.raises(UnreadableSampleError) as error:
        build_datasets(dvs_args(root))
    assert str(error.value) == (
        f'{broken} cannot be read (ValueError: no p array; it holds t, x, y); it is a CIFAR10-DVS sample, in the '
        'events that the frames are made from, and cannot be made from the frames. Delete it to go on without the '
        'sample, or, to have the sample back, put the original files (the ten per-class archives published on '
        f"figshare) into {root / 'download'}/ and delete {root / 'events_np'}, so that the next run converts them "
        'again')
    broken.unlink()
    train_set, test_set = build_datasets(dvs_args(root))
    assert (len(train_set), len(test_set)) == (20, 2)  # cat: 11 samples left, 10 + 1


def test_truncated_events_file_is_converted_again_from_the_originals(tmp_path, monkeypatch):
    root = tmp_path / 'CIFAR10DVS'
    resources = write_cifar10_dvs_archives(root / 'download', CIFAR_CLASSES)
    monkeypatch.setattr(cifar10_dvs.CIFAR10DVS, 'resource_url_md5', staticmethod(lambda: resources))
    build_datasets(dvs_args(root, frames=2))  # extract/, events_np/ and the 2-frame folder
    broken = root / 'events_np' / 'cat' / 'cifar10_cat_9.npz'
    with np.load(broken) as stored:
        original = {key: stored[key] for key in stored.files}
    truncate_file(broken)
    with pytest.raises(UnreadableSampleError) as error:
        build_datasets(dvs_args(root, frames=3))  # a new frames folder: every sample is integrated
    assert str(error.value) == (
        f'{broken} cannot be read (BadZipFile: File is not a zip file); it is a CIFAR10-DVS sample, in the events that '
        'the frames are made from, and cannot be made from the frames. Delete it to go on without the sample, or '
        f"delete {root / 'events_np'}: the next run converts the original files in {root / 'extract'} again")
    shutil.rmtree(root / 'events_np')
    shutil.rmtree(root / 'download')  # extract/ is enough, as the advice says
    _, test_set = build_datasets(dvs_args(root, frames=3))
    with np.load(broken) as stored:
        assert all(np.array_equal(stored[key], values) for key, values in original.items())
    frames, label = test_set[1]
    assert test_set.samples[1][0].endswith('cat/cifar10_cat_9.npz') and label == 1
    assert frames.shape == (3, 2, 128, 128) and frames.sum() == 39  # 30 + 9 events


@pytest.mark.parametrize('workers', [0, 2])
def test_broken_frames_file_is_named_and_integrated_again_once_deleted(tmp_path, workers):
    root = cifar10_dvs_events(tmp_path / 'dvs')
    _, test_set = build_datasets(dvs_args(root, workers=workers))
    intact = test_set[1][0]
    frames_file = root / 'frames_number_2_split_by_number' / 'cat' / 'cifar10_cat_9.npz'
    truncate_file(frames_file, keep=0.3)
    message = loader_error(build_eval_batches(dvs_args(root, workers=workers), test_set, ONE_PROCESS, CPU, 1).epoch())
    assert message == (
        f'{frames_file} cannot be read (BadZipFile: File is not a zip file); it is a CIFAR10-DVS frames file, a '
        f"partial or damaged one. Delete it (or the whole {root / 'frames_number_2_split_by_number'}): the next run "
        f"integrates it again from {root / 'events_np' / 'cat' / 'cifar10_cat_9.npz'}")
    frames_file.unlink()
    _, test_set = build_datasets(dvs_args(root))
    assert torch.equal(test_set[1][0], intact) and not list(root.rglob('*.partial'))  # no temporary file left


def test_an_unfinished_spikingjelly_2_folder_is_named(tmp_path):
    root = cifar10_dvs_events(tmp_path / 'dvs')
    marker = root / 'frames_number_2_split_by_number.building'
    marker.touch()
    with pytest.raises(DatasetError) as error:
        build_datasets(dvs_args(root))
    assert str(error.value) == (f'{marker} marks an unfinished conversion by spikingjelly: delete {marker}; the next '
                                'run makes them again')
    marker.unlink()
    assert len(build_datasets(dvs_args(root))[0]) == 21


# --- skipping unreadable training samples ----------------------------------------------------------------

class Numbers(Dataset):
    """Sample i is the tensor i, from the file /data/<i>.JPEG; those in ``unreadable`` cannot be read."""

    def __init__(self, size, unreadable):
        self.samples = [(f'/data/{i}.JPEG', 0) for i in range(size)]
        self.unreadable = unreadable

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        if index in self.unreadable:
            raise UnreadableSampleError(f'/data/{index}.JPEG cannot be read', path=f'/data/{index}.JPEG')
        return torch.tensor(index)


@pytest.mark.parametrize('workers', [0, 1, 2])
def test_skipped_samples_are_replaced_by_the_next_one_and_counted_once(workers):
    train_set = SkipUnreadable(Numbers(8, {1, 5}), 2, 'numbers')
    loader = DataLoader(train_set, batch_size=4, num_workers=workers)
    for _ in range(2):  # the second epoch's workers know both files: no new skip, no error
        assert [batch.tolist() for batch in loader] == [[0, 2, 2, 3], [4, 6, 6, 7]]
    assert sorted(train_set.skipped_files()) == ['/data/1.JPEG', '/data/5.JPEG']


def test_each_skipped_file_is_one_warning(caplog):
    train_set = SkipUnreadable(Numbers(8, {1, 5}), 3, 'numbers')
    with caplog.at_level(logging.WARNING, logger='sglformer.data.unreadable'):
        for _ in range(3):
            list(DataLoader(train_set, batch_size=4))
    assert [record.getMessage() for record in caplog.records] == [
        f'numbers: unreadable training sample {n} of at most 3 (max_unreadable_samples) skipped, the next readable '
        f'sample is used instead: /data/{i}.JPEG cannot be read' for n, i in ((1, 1), (2, 5))]


@pytest.mark.parametrize('workers', [0, 1, 2])
def test_one_more_unreadable_sample_than_allowed_ends_the_run(workers):
    """With two workers, each meets one of the two files: the limit holds across them."""
    loader = DataLoader(SkipUnreadable(Numbers(8, {1, 5}), 1, 'numbers'), batch_size=4, num_workers=workers)
    failed, limit_line = loader_error(loader).split('\n')
    listed = 'max_unreadable_samples is 1, and the run has skipped that many unreadable training samples already: '
    assert limit_line.startswith(listed)
    assert {failed, f'{limit_line[len(listed):]} cannot be read'} == {'/data/1.JPEG cannot be read',
                                                                     '/data/5.JPEG cannot be read'}


def test_no_skipping_by_default_and_nothing_readable():
    assert loader_error(DataLoader(SkipUnreadable(Numbers(4, {2}), 0, 'numbers'), batch_size=2)) == (
        '/data/2.JPEG cannot be read\nmax_unreadable_samples is 0, so the first unreadable training sample ends the '
        'run; set it to N to skip up to N of them (each is replaced by the next readable sample)')
    with pytest.raises(UnreadableSampleError, match='none of the 2 training samples of numbers can be read'):
        SkipUnreadable(Numbers(2, {0, 1}), 5, 'numbers')[0]


# --- the same frames, splits, labels and augmentation on both spikingjelly stacks ----------------------

def test_frames_of_hand_made_events(tmp_path):
    """Split by number: 5 events in 2 frames are 2 + 3; x is the column, y the row, p the channel, and
    events on one pixel add up. Labels are the class folders' indices in string order."""
    root = tmp_path / 'gesture'
    for split in ('train', 'test'):
        write_events_np(root / 'events_np' / split, {'0': 1, '2': 1}, f'{split}_user')
    write_events_np(root / 'events_np' / 'test', {'10': 1}, 'test_user')
    (root / 'events_np' / 'train' / '10').mkdir()
    events = {'t': np.arange(5, dtype=np.uint32), 'x': np.array([0, 3, 3, 3, 127], np.uint32),
              'y': np.array([0, 1, 1, 1, 126], np.uint32), 'p': np.array([0, 1, 1, 1, 0])}
    write_events_file(root / 'events_np' / 'train' / '10' / 'hand_made.npz', events)
    train_set, test_set = build_datasets(dvs_args(root, folder='dvs128-gesture'))
    assert train_set.classes == test_set.classes == ['0', '10', '2']
    assert [path.rsplit('/', 1)[1] for path, _ in train_set.samples] == [
        'train_user_0_0.npz', 'hand_made.npz', 'train_user_2_0.npz'] and train_set.targets == [0, 1, 2]
    frames = train_set.base[1][0]  # spikingjelly's frames, before the augmentation
    expected = np.zeros((2, 2, 128, 128), np.float32)
    expected[0, 0, 0, 0] = expected[0, 1, 1, 3] = expected[1, 0, 126, 127] = 1
    expected[1, 1, 1, 3] = 2
    assert frames.dtype == np.float32 and np.array_equal(frames, expected)


def test_frames_and_split_of_the_synthetic_dataset_are_pinned(tmp_path):
    train_set, test_set = build_datasets(dvs_args(cifar10_dvs_events(tmp_path / 'dvs')))
    names = [[path.rsplit('/', 1)[1][8:-4] for path, _ in dataset.samples] for dataset in (train_set, test_set)]
    assert names == [[f'airplane_{i}' for i in (0, 1, 10, 2, 3, 4, 5, 6, 7, 8)] +
                     [f'cat_{i}' for i in (0, 1, 10, 11, 2, 3, 4, 5, 6, 7, 8)], ['airplane_9', 'cat_9']]
    assert train_set.targets == [0] * 10 + [1] * 11 and test_set.targets == [0, 1]
    frames = [train_set.base[i][0] for i in train_set.indices + test_set.indices]
    assert digest(frames) == '74fa9261eaeb6c81'  # also spikingjelly's own integration, either version


def test_augmentation_is_pinned_under_a_seed():
    frames = torch.randint(0, 3, (2, 2, 16, 16), generator=torch.Generator().manual_seed(5)).float()
    augment = EventAugment()
    torch.manual_seed(0)
    outputs = [augment(frames.clone()).numpy() for _ in range(24)]
    assert digest(outputs) == 'ebe649e6fdfe2822'
