"""The registered SGLFormer variants. Each dataset folder's ``model.py`` declares its variants; pyproject.toml
installs the folder as a subpackage of this one (``cifar10-dvs/`` as ``sglformer.variants.cifar10_dvs``), so
that an installed package, a wheel as well as an editable checkout, registers them with one import."""
import importlib

# Dataset folder -> the package pyproject.toml installs it as.
DATASET_FOLDERS = {'cifar10': 'cifar10', 'cifar100': 'cifar100', 'cifar10-dvs': 'cifar10_dvs',
                   'dvs128-gesture': 'dvs128_gesture', 'imagenet': 'imagenet'}


def load_variants() -> list:
    """Register every dataset folder's variants with timm; returns their names in folder order."""
    names = []
    for folder, package in DATASET_FOLDERS.items():
        try:
            module = importlib.import_module(f'{__name__}.{package}.model')
        except ModuleNotFoundError as exc:
            if not exc.name.startswith(__name__):
                raise
            raise ModuleNotFoundError(f'{exc.name} (the folder {folder}/) is not installed: install the package '
                                      '(pip install -e . in a checkout), then run again', name=exc.name) from None
        names.extend(module.__all__)
    return names
