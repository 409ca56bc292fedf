"""Shared fixtures. Tests that need ../shared (goldens, manifests) skip with a reason where it is absent."""
import contextlib
import logging
import os
import socket
from pathlib import Path

import pytest
import torch

import sglformer

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get('SGLFORMER_SHARED', REPO_ROOT.parent / 'shared'))  # the reference tensors

# The model each dataset folder's train.py trains by default.
FOLDER_MODELS = {
    'cifar10': 'sglformer_cifar10', 'cifar100': 'sglformer_cifar100', 'cifar10-dvs': 'sglformer_cifar10dvs',
    'dvs128-gesture': 'sglformer_dvs128gesture', 'imagenet': 'sglformer_ima_8_512',
}

# The registered model of each golden file's `arch`.
GOLDEN_MODELS = {
    'cifar10': 'sglformer_cifar10', 'cifar100': 'sglformer_cifar100',
    'cifar10-dvs': 'sglformer_cifar10dvs', 'dvs128-gesture': 'sglformer_dvs128gesture',
    'ima': 'sglformer_ima_8_384', 'ima2': 'sglformer_ima2_8_384',
}


def free_port():
    """A TCP port nobody listens on now, for a test's torch.distributed rendezvous (fixed ports collide
    when two test runs share a machine)."""
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return str(probe.getsockname()[1])


def shared_files(folder, pattern):
    """Files of ../shared/<folder> for parametrisation, or one skipped case saying why there are none."""
    files = sorted((SHARED / folder).glob(pattern))
    if not files:
        return [pytest.param(None, marks=pytest.mark.skip(reason=f'{SHARED / folder} is absent or empty'))]
    return [pytest.param(f, id=f.stem) for f in files]


@pytest.fixture(scope='session', autouse=True)
def one_thread():
    """One intra-op thread: the tests' models are tiny, and on a small machine shared with other work
    more threads stall each other on every step."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='session', autouse=True)
def registered_variants():
    logging.getLogger('sglformer').setLevel(logging.INFO)
    return sglformer.load_variants()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class SimulatedCrash(BaseException):
    """A process that dies where it stands (as with kill -9): not an error the run could report."""


@contextlib.contextmanager
def crash_at_epoch(epoch):
    """Within the block, training dies when it reaches ``epoch``, after the checkpoints of the epochs
    before it were written: a simulated crash."""
    from sglformer import engine
    real = engine.train_one_epoch

    def crashing(trainer, batches, at, cfg):
        if at == epoch:
            raise SimulatedCrash()
        return real(trainer, batches, at, cfg)

    engine.train_one_epoch = crashing
    try:
        with pytest.raises(SimulatedCrash):
            yield
    finally:
        engine.train_one_epoch = real


def assert_same(a, b, where='checkpoint'):
    """Equal nested containers: the same keys in the same order, the same lengths, equal tensors."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            assert_same(a[key], b[key], f'{where}[{key!r}]')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f'{where}[{index}]')
    else:
        assert a == b, where


def assert_resumed_equals_straight(resumed, straight, weights='state_dict'):
    """A resumed run's last checkpoint holds the epoch, weights, optimiser state (and weight average) of
    the uninterrupted run's."""
    assert resumed['epoch'] == straight['epoch']
    assert straight['optimizer']['state'], 'the optimiser has taken no step'
    for key in (weights, 'optimizer', 'state_dict_ema'):
        assert (key in resumed) == (key in straight), key
        if key in straight:
            assert_same(resumed[key], straight[key], key)


def train_script(folder, *flags):
    """Run ``<folder>/train.py`` in this process, as its ``__main__`` does."""
    from sglformer import training
    return training.main(list(flags), default_config=REPO_ROOT / folder / f'{folder}.yml',
                         defaults={'model': FOLDER_MODELS[folder]})
