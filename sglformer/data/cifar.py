"""CIFAR-10 and CIFAR-100 in torchvision's on-disk layout.

torchvision's CIFAR classes verify every file against the official MD5 sums, which refuses any file
that is not the official download (the tests' synthetic data, a re-packed copy). Here the integrity
check belongs to the download: torchvision downloads and verifies the archive when the folder is
absent; files already on disk are read as they are, and a malformed one gets an error naming it.
"""
import pickle
from pathlib import Path

import numpy as np
import torchvision
from PIL import Image
from torch.utils.data import Dataset

from .errors import DatasetError

LAYOUTS = {
    # dataset: (folder, train files, test files, label key, meta file, class-names key)
    'cifar10': ('cifar-10-batches-py', tuple(f'data_batch_{i}' for i in range(1, 6)), ('test_batch',),
                b'labels', 'batches.meta', b'label_names'),
    'cifar100': ('cifar-100-python', ('train',), ('test',), b'fine_labels', 'meta', b'fine_label_names'),
}
DOWNLOADERS = {'cifar10': torchvision.datasets.CIFAR10, 'cifar100': torchvision.datasets.CIFAR100}


def find_cifar_folder(root, name):
    """The folder holding the batches: ``root`` itself or ``root/<torchvision's folder name>``."""
    folder_name, train_files, test_files = LAYOUTS[name][:3]
    root = Path(root)
    for candidate in (root / folder_name, root):
        if all((candidate / f).is_file() for f in train_files + test_files):
            return candidate
    return None


def prepare_cifar(root, name, download):
    """Return the batches folder, downloading (and verifying) the official archive if it is absent."""
    folder = find_cifar_folder(root, name)
    if folder is None and download:
        try:
            DOWNLOADERS[name](root=str(root), train=True, download=True)
        except Exception as exc:  # no network, no permission, ...
            raise DatasetError(_missing_message(root, name, f'the download failed ({exc})')) from None
        folder = find_cifar_folder(root, name)
    if folder is None:
        raise DatasetError(_missing_message(root, name, 'download is off' if not download else 'the download did not produce it'))
    return folder


def _missing_message(root, name, why):
    folder_name, train_files, test_files = LAYOUTS[name][:3]
    return (f'{name} not found under {root} and {why}. Expected {Path(root) / folder_name}/ holding '
            f"{', '.join(train_files + test_files)} (the python version from "
            f'https://www.cs.toronto.edu/~kriz/cifar.html, unpacked), or pass --data-dir pointing at that folder')


def _read_batch(path, label_key):
    try:
        with open(path, 'rb') as f:
            batch = pickle.load(f, encoding='bytes')
        data = np.asarray(batch[b'data'], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except Exception as exc:
        raise DatasetError(f'{path} is not a CIFAR batch file ({type(exc).__name__}: {exc})') from None
    if len(data) != len(labels):
        raise DatasetError(f'{path}: {len(data)} images but {len(labels)} labels')
    return data, labels


class CIFAR(Dataset):
    """CIFAR-10/100 images (PIL, RGB) and labels read from the python-pickle batches."""

    def __init__(self, root, name='cifar10', train=True, transform=None, download=True):
        if name not in LAYOUTS:
            raise ValueError(f"name must be one of {', '.join(LAYOUTS)}, got {name!r}")
        _, train_files, test_files, label_key, meta_file, names_key = LAYOUTS[name]
        self.folder = prepare_cifar(root, name, download)
        parts = [_read_batch(self.folder / f, label_key) for f in (train_files if train else test_files)]
        self.data = np.concatenate([p[0] for p in parts])
        self.targets = np.concatenate([p[1] for p in parts]).tolist()
        meta = self.folder / meta_file
        if meta.is_file():
            with open(meta, 'rb') as f:
                self.classes = [c.decode() for c in pickle.load(f, encoding='bytes')[names_key]]
        else:
            self.classes = [str(i) for i in range(max(self.targets) + 1)]
        self.transform = transform

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        image = Image.fromarray(self.data[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]

