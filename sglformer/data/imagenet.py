"""ImageNet-1K (or any labelled image set) in torchvision's ImageFolder layout:
``data_path/train/<class>/<image>`` and ``data_path/val/<class>/<image>``, one folder per class, named
the same in both splits (for ImageNet the WordNet ids, e.g. ``train/n01440764/n01440764_10026.JPEG``).
Labels are the class folders' indices in sorted order.
"""
import functools
from pathlib import Path

from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import default_loader

from .errors import DatasetError, UnreadableSampleError

LAYOUT = ('expected {root}/train/<wnid>/*.JPEG and {root}/val/<wnid>/*.JPEG, one folder per class with the same '
          'names in both (e.g. train/n01440764/n01440764_10026.JPEG, val/n01440764/ILSVRC2012_val_00000293.JPEG). '
          'Unpack ILSVRC2012_img_train.tar and its per-class tars into train/, ILSVRC2012_img_val.tar into val/ and '
          'move each validation image into the folder of its class (the widely used valprep.sh script does this), '
          'then pass --data_path pointing at the folder holding train/ and val/')


def read_image(path, folder):
    """torchvision's image loader, with an error that names the file (PIL's, e.g. 'Truncated File
    Read' for a partial JPEG, does not)."""
    try:
        return default_loader(path)
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... by format and damage
        raise UnreadableSampleError(
            f'{path} cannot be read as an image ({type(exc).__name__}: {exc}); it is an image of {folder}, a partial '
            'or damaged copy. Copy it again from the original archive, or delete it: the next run goes on without '
            'it', path=path) from None


def _class_folders(folder):
    return sorted(entry.name for entry in folder.iterdir() if entry.is_dir())


def _image_folder(root, split, transform):
    folder = Path(root) / split
    if not folder.is_dir():
        raise DatasetError(f'{folder} not found: {LAYOUT.format(root=root)}')
    try:
        return ImageFolder(str(folder), transform=transform, loader=functools.partial(read_image, folder=folder))
    except FileNotFoundError as exc:  # no class folders, or a class folder without images
        raise DatasetError(f'{folder}: {exc}; {LAYOUT.format(root=root)}') from None


def image_folder_datasets(root, train_transform, eval_transform, training=True):
    """``(train, val)`` ImageFolder datasets; ``train`` is None when ``training`` is False. The class
    folders of the two splits must match (else the labels would silently differ)."""
    evaluation = _image_folder(root, 'val', eval_transform)
    train = _image_folder(root, 'train', train_transform) if training else None
    train_classes = train.classes if train is not None else (
        _class_folders(Path(root) / 'train') if (Path(root) / 'train').is_dir() else None)
    if train_classes is not None and train_classes != evaluation.classes:
        missing = sorted(set(train_classes) ^ set(evaluation.classes))
        raise DatasetError(f'{root}: train/ has {len(train_classes)} class folders and val/ {len(evaluation.classes)}, '
                           f"and they differ ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}): "
                           'both need the same class folders')
    return train, evaluation
