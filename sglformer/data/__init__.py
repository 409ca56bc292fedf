"""Datasets and loaders by the ``dataset`` option's name."""
import torch
from PIL import Image
from timm.data import auto_augment, create_transform
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from ..config import ConfigError
from .cifar import CIFAR, DatasetError
from .dvs import EVENT_DATASET_NAMES, build_event_datasets
from .imagenet import image_folder_datasets

# The authors' names (timm's ``torch/cifar10``) and plain ones.
CIFAR_NAMES = {'torch/cifar10': 'cifar10', 'cifar10': 'cifar10', 'torch/cifar100': 'cifar100', 'cifar100': 'cifar100'}
IMAGE_FOLDER_NAMES = ('imagenet', 'image_folder')
DATASETS = tuple(CIFAR_NAMES) + IMAGE_FOLDER_NAMES + tuple(EVENT_DATASET_NAMES)

__all__ = ['DatasetError', 'build_datasets', 'build_loader', 'ShardSampler']


def posterize(img, bits_to_keep, **kwargs):
    """timm's posterize, where keeping 0 bits gives a black image, as it did with the Pillow of the
    authors' runs: timm's RandAugment asks for 0 bits at magnitude 10 (``inc1`` policies, reached through
    ``mstd``), which current Pillow refuses with a ValueError that would stop the run."""
    if bits_to_keep < 1:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def image_transforms(args, is_training):
    """timm's train or eval transform from the run's options (the authors' pipeline, without the
    CUDA prefetcher: normalisation and random erasing happen in the transform)."""
    if is_training:
        transform = create_transform(
            args.img_size, is_training=True, scale=tuple(args.scale), ratio=tuple(args.ratio), hflip=args.hflip,
            vflip=args.vflip, color_jitter=args.color_jitter, auto_augment=args.aa,
            interpolation=args.train_interpolation, mean=tuple(args.mean), std=tuple(args.std),
            re_prob=args.reprob, re_mode=args.remode, re_count=args.recount)
        for step in transform.transforms:
            for op in getattr(step, 'ops', ()):
                if op.aug_fn is auto_augment.posterize:
                    op.aug_fn = posterize
        return transform
    return create_transform(args.img_size, is_training=False, interpolation=args.interpolation,
                            mean=tuple(args.mean), std=tuple(args.std), crop_pct=args.crop_pct)


def build_datasets(args, training=True):
    """``(train, eval)`` datasets for ``args.dataset``; ``train`` is None when ``training`` is False."""
    if args.dataset in CIFAR_NAMES:
        name = CIFAR_NAMES[args.dataset]
        train = CIFAR(args.data_dir, name, train=True, transform=image_transforms(args, True),
                      download=args.download) if training else None
        evaluation = CIFAR(args.data_dir, name, train=False, transform=image_transforms(args, False),
                           download=args.download)
        return train, evaluation
    if args.dataset in IMAGE_FOLDER_NAMES:
        return image_folder_datasets(args.data_dir, image_transforms(args, True) if training else None,
                                     image_transforms(args, False), args.num_classes, training)
    if args.dataset in EVENT_DATASET_NAMES:
        return build_event_datasets(args, EVENT_DATASET_NAMES[args.dataset], training)
    raise ConfigError(f"unknown dataset {args.dataset!r}; known: {', '.join(DATASETS)}")


class ShardSampler(Sampler):
    """Every ``world_size``-th batch of ``batch_size`` consecutive indices from batch ``rank``: each
    sample is evaluated exactly once over all processes, in the batches one process would form (the
    ImageNet models' outputs depend on the other images of the batch)."""

    def __init__(self, length, rank, world_size, batch_size=1):
        self.indices = [i for start in range(rank * batch_size, length, world_size * batch_size)
                        for i in range(start, min(start + batch_size, length))]

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def build_loader(dataset, batch_size, workers, pin_memory, dist, training, seed=0):
    """Training: reshuffled every epoch from ``seed`` (call ``loader.sampler.set_epoch``), incomplete
    last batch dropped. Evaluation: in order, sharded exactly over processes in whole batches."""
    if training:
        sampler = DistributedSampler(dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=True,
                                     seed=seed, drop_last=True)
    else:
        sampler = ShardSampler(len(dataset), dist.rank, dist.world_size, batch_size)
    if training and len(sampler) < batch_size:
        raise DatasetError(f'the training set has {len(dataset)} samples, fewer than one batch of {batch_size} '
                           f'per process ({dist.world_size} processes): lower --batch-size')
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                      drop_last=training, generator=torch.Generator(), persistent_workers=False)
