"""Import the dataset folders' ``model.py`` files, which register the SGLFormer variants with timm.

The folders are not Python packages (``cifar10-dvs`` is not an identifier), so each file is loaded
by path, once per process, under a stable module name.
"""
import importlib.util
import sys
from pathlib import Path

import timm

from .config import ConfigError

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


# Options (sglformer.config) that map onto model constructor keywords (the authors' names).
MODEL_OPTIONS = {'time_step': 'T', 'layer': 'depths', 'dim': 'embed_dims', 'num_heads': 'num_heads',
                 'mlp_ratio': 'mlp_ratios', 'num_classes': 'num_classes', 'patch_size': 'patch_size',
                 'neuron': 'neuron', 'neuron_backend': 'neuron_backend'}


def create_model(args):
    """The registered model ``args.model`` with the size and neuron options that are set (None keeps the
    variant's). The neurons are as ``args`` name them: ``neuron='auto'`` is settled by the model's first
    forward (or, once, by the caller through :func:`sglformer.neuron.choose_neuron`)."""
    load_variants()
    kwargs = {kw: getattr(args, opt) for opt, kw in MODEL_OPTIONS.items() if getattr(args, opt, None) is not None}
    if getattr(args, 'img_size', None) is not None:
        kwargs.update(img_size_h=args.img_size, img_size_w=args.img_size)
    try:
        return timm.create_model(args.model, **kwargs)
    except RuntimeError as exc:
        if 'Unknown model' in str(exc):
            raise ConfigError(f"unknown model {args.model!r}; registered: {', '.join(load_variants())}") from None
        raise
