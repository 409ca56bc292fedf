"""Synthetic datasets in the real on-disk formats, for the test suite and ``make demo``; nothing in
training imports it.

CIFAR-10/100 python pickles, ImageFolder JPEGs, spikingjelly's events_np ``.npz`` files and the original
CIFAR10-DVS archives (AER-DAT 2.0 files, one zip per class); the ``truncated`` and ``omit`` options
write damaged files, as a partial copy leaves them.
"""
import hashlib
import pickle
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from .data.cifar import LAYOUTS


def write_synthetic_cifar(root, name='cifar10', train_per_class=20, test_per_class=5, num_classes=None, seed=0):
    """A small, learnable CIFAR-layout dataset: each class is a distinct colour pattern plus noise,
    written as pickled dicts of uint8 rows. Returns the batches folder."""
    folder_name, train_files, test_files, label_key, meta_file, names_key = LAYOUTS[name]
    num_classes = num_classes or (10 if name == 'cifar10' else 100)
    rng = np.random.default_rng(seed)
    patterns = rng.integers(0, 256, size=(num_classes, 3, 4, 4)).repeat(8, axis=2).repeat(8, axis=3)

    def make(per_class):
        labels = np.repeat(np.arange(num_classes), per_class)
        rng.shuffle(labels)
        noise = rng.normal(0, 40, size=(len(labels), 3, 32, 32))
        images = np.clip(patterns[labels] + noise, 0, 255).astype(np.uint8)
        return images.reshape(len(labels), -1), labels.tolist()

    folder = Path(root) / folder_name
    folder.mkdir(parents=True, exist_ok=True)
    for files, per_class in ((train_files, train_per_class), (test_files, test_per_class)):
        data, labels = make(per_class)
        for i, file in enumerate(files):
            part = slice(i * len(labels) // len(files), (i + 1) * len(labels) // len(files))
            with open(folder / file, 'wb') as f:
                pickle.dump({b'data': data[part], label_key: labels[part]}, f)
    with open(folder / meta_file, 'wb') as f:
        pickle.dump({names_key: [f'class{i}'.encode() for i in range(num_classes)]}, f)
    return folder


def truncate_file(path, keep=0.5):
    """Cut ``path`` to the first ``keep`` share of its bytes, as an interrupted copy leaves it."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:int(len(data) * keep)])


def write_image_folder(root, classes, counts, size=(40, 48), seed=0, truncated=()):
    """ImageNet's layout, ``root/<split>/<class>/<class>_<i>.JPEG`` with ``counts[split]`` images per
    class, each a noise image tinted by its class; the files named (relative to ``root``) in
    ``truncated`` are cut to half their bytes. Returns ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, count in counts.items():
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 96, (*size, 3)) + np.array([40 * label, 160 - 40 * label, 80])
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f'{name}_{i}.JPEG')
    for relative in truncated:
        truncate_file(root / relative)
    return root


def events_of(name, count):
    """``count`` events of a 128x128 sensor (t, x, y, p as spikingjelly stores them), a different
    pattern per sample name."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    return {'t': np.sort(rng.integers(0, 10_000, count)).astype(np.uint32),
            'x': rng.integers(0, 128, count).astype(np.uint32), 'y': rng.integers(0, 128, count).astype(np.uint32),
            'p': rng.integers(0, 2, count)}


def write_events_file(path, events, omit=()):
    """One events_np sample, an .npz of the arrays of ``events`` except those named in ``omit``."""
    np.savez(path, **{key: values for key, values in events.items() if key not in omit})


def write_events_np(folder, classes, prefix):
    """spikingjelly's events_np layout: ``folder/<class>/<prefix>_<class>_<i>.npz`` for
    ``i < classes[class]``, sample i of a class with 20 + i events."""
    for label, count in classes.items():
        (Path(folder) / label).mkdir(parents=True)
        for i in range(count):
            name = f'{prefix}_{label}_{i}'
            write_events_file(Path(folder) / label / f'{name}.npz', events_of(name, 20 + i))


def aedat(events):
    """An original CIFAR10-DVS file: AER-DAT 2.0 header lines, then big-endian (address, timestamp)
    pairs, the address holding the polarity in bit 0, the column in bits 1-7 and the row in bits 8-14."""
    header = b'#!AER-DAT2.0\r\n# This is a raw AE data file\r\n# created for a test\r\n'
    address = (events['row'] << 8) | (events['column'] << 1) | events['polarity']
    return header + np.stack([address, events['t']], 1).astype('>u4').tobytes()


def write_cifar10_dvs_archives(download, classes):
    """The original CIFAR10-DVS download: ``download/<class>.zip`` holding ``<class>/cifar10_<class>_<i>.aedat``
    (30 + i random events) for ``i < classes[class]``. Returns spikingjelly's ``resource_url_md5`` list
    for these archives."""
    Path(download).mkdir(parents=True, exist_ok=True)
    resources = []
    for label, count in classes.items():
        archive = Path(download) / f'{label}.zip'
        with zipfile.ZipFile(archive, 'w') as zf:
            for i in range(count):
                rng = np.random.default_rng(i)
                n = 30 + i
                zf.writestr(f'{label}/cifar10_{label}_{i}.aedat', aedat(
                    {'row': rng.integers(0, 128, n), 'column': rng.integers(0, 128, n),
                     'polarity': rng.integers(0, 2, n), 't': np.arange(n) * 7}))
        resources.append((archive.name, 'https://example.org', hashlib.md5(archive.read_bytes()).hexdigest()))
    return resources
