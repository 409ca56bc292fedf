"""Import the dataset folders' ``model.py`` files, which register the SGLFormer variants with timm.

The folders are not Python packages (``cifar10-dvs`` is not an identifier), so each file is loaded
by path, once per process, under a stable module name.
"""
import importlib.util
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DATASET_FOLDERS = ('cifar10', 'cifar100', 'cifar10-dvs', 'dvs128-gesture', 'imagenet')


def import_file(path, module_name=None):
    """Import a Python file by path; a second call returns the module already loaded."""
    path = Path(path).resolve()
    if module_name is None:
        module_name = 'sglformer_folders.' + '_'.join(
            part.replace('-', '_') for part in (path.parent.name, path.stem))
    if module_name in sys.modules:
        return sys.modules[module_name]
    if not path.is_file():
        raise FileNotFoundError(f'{path} not found: run from a checkout of the SGLFormer repository')
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # timm's register_model looks the module up here
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def load_variants(folders=DATASET_FOLDERS):
    """Register every folder's variants with timm; returns the registered names in folder order."""
    names = []
    for folder in folders:
        module = import_file(REPO_ROOT / folder / 'model.py')
        names.extend(module.__all__)
    return names
