"""Datasets and loaders by the ``dataset`` option's name (docs/datasets.md).

Each kind of dataset is loaded the way the authors' script for it loads it:

- CIFAR (timm's train.py with its prefetcher): transforms end in uint8 images; the collate step mixes
  them (timm's ``FastCollateMixup``, rounding to uint8); timm's ``PrefetchLoader`` normalises the batch
  and applies random erasing to it on the device. Without the prefetcher (``--no-prefetcher``), as ImageNet.
- ImageNet (the MAE fine-tuning script): timm's transforms normalise and erase each image; mixup, when
  on, mixes the batch on the device.
- Event data (the DVS scripts): the frame augmentation of :mod:`sglformer.data.augment` per sample; mixup on
  the device.
"""
import torch
from PIL import Image
from timm.data import FastCollateMixup, Mixup, auto_augment, create_transform
from timm.data.loader import PrefetchLoader, fast_collate
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from ..config import ConfigError
from .cifar import CIFAR
from .dvs import EVENT_DATASET_NAMES, build_event_datasets
from .errors import DatasetError, UnreadableSampleError
from .imagenet import image_folder_datasets
from .unreadable import SkipUnreadable

# The authors' names (timm's ``torch/cifar10``) and plain ones.
CIFAR_NAMES = {'torch/cifar10': 'cifar10', 'cifar10': 'cifar10', 'torch/cifar100': 'cifar100', 'cifar100': 'cifar100'}
IMAGE_FOLDER_NAMES = ('imagenet', 'image_folder')
DATASETS = tuple(CIFAR_NAMES) + IMAGE_FOLDER_NAMES + tuple(EVENT_DATASET_NAMES)
IMAGENET_MEAN, IMAGENET_STD, IMAGENET_CROP_PCT = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 0.875

__all__ = ['DatasetError', 'UnreadableSampleError', 'dataset_family', 'build_datasets', 'build_train_batches', 'build_eval_batches',
           'ShardSampler']


def dataset_family(name):
    """``'cifar'``, ``'imagenet'`` or ``'events'``: how a dataset is read and augmented."""
    if name in CIFAR_NAMES:
        return 'cifar'
    if name in IMAGE_FOLDER_NAMES:
        return 'imagenet'
    if name in EVENT_DATASET_NAMES:
        return 'events'
    raise ConfigError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")


def posterize(img, bits_to_keep, **kwargs):
    """timm's posterize, where keeping 0 bits gives a black image, as it did with the Pillow of the
    authors' runs: timm's RandAugment asks for 0 bits at magnitude 10 (``inc1`` policies, reached through
    ``mstd``), which current Pillow refuses with a ValueError that would stop the run."""
    if bits_to_keep < 1:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def _normalisation(cfg):
    return tuple(cfg.mean or IMAGENET_MEAN), tuple(cfg.std or IMAGENET_STD)


def image_transforms(cfg, is_training):
    """timm's train or eval transform from the run's options. With the prefetcher it stops at uint8 images (the
    prefetcher normalises and erases the batch), without it normalises and erases each image."""
    mean, std = _normalisation(cfg)
    prefetch = _prefetches(cfg)
    if not is_training:
        return create_transform(cfg.img_size, is_training=False, interpolation=cfg.interpolation, mean=mean, std=std,
                                crop_pct=cfg.crop_pct or IMAGENET_CROP_PCT, use_prefetcher=prefetch)
    try:
        transform = create_transform(
            cfg.img_size, is_training=True, no_aug=not cfg.augment, scale=tuple(cfg.scale), ratio=tuple(cfg.ratio),
            hflip=cfg.hflip, vflip=cfg.vflip, color_jitter=cfg.color_jitter, auto_augment=cfg.aa,
            interpolation=cfg.train_interpolation, mean=mean, std=std, re_prob=cfg.reprob, re_mode=cfg.remode,
            re_count=cfg.recount, use_prefetcher=prefetch)
    except (AssertionError, KeyError, ValueError) as exc:
        if not cfg.aa:
            raise
        raise ConfigError(f"'aa' {cfg.aa!r} is not an augmentation policy of timm ({exc or type(exc).__name__}): for "
                          'example rand-m9-n1-mstd0.4-inc1 (RandAugment), augmix-m5-w4-d2, original') from None
    for step in transform.transforms:
        for op in getattr(step, 'ops', ()):
            if op.aug_fn is auto_augment.posterize:
                op.aug_fn = posterize
    return transform


def _prefetches(cfg):
    """Whether the batches go through timm's prefetcher, as in the authors' CIFAR runs."""
    return dataset_family(cfg.dataset) == 'cifar' and cfg.prefetcher


def build_datasets(cfg, training=True, num_classes=None):
    """``(train, eval)`` datasets for ``cfg.dataset``; ``train`` is None when ``training`` is False. Both must
    hold samples, and with ``num_classes`` (the model's outputs) every label must have an output.
    Up to ``max_unreadable_samples`` training samples whose file cannot be read are skipped; evaluation
    never skips, so that accuracy is over the whole set."""
    train, evaluation = _datasets(cfg, training)
    splits = {'training': train, 'evaluation': evaluation} if training else {'evaluation': evaluation}
    if not all(len(split) for split in splits.values()):
        raise DatasetError(_empty_split(cfg, splits))
    classes = max(max(split.targets) + 1 for split in splits.values())
    if num_classes is not None and classes > num_classes:
        raise DatasetError(f'{cfg.data_dir} holds {classes} classes but the model has {num_classes} outputs: set '
                           f'num_classes (--num-classes {classes}), or use the data of the model')
    if train is not None:
        train = SkipUnreadable(train, cfg.max_unreadable_samples, cfg.dataset)
    return train, evaluation


def _empty_split(cfg, splits):
    names = next(split.classes for split in splits.values() if getattr(split, 'classes', None))
    counts = {name: ', '.join(f'{kind} {split.targets.count(label)}' for kind, split in splits.items())
              for label, name in enumerate(names)}
    listed = '; '.join(f'{name}: {count}' for name, count in list(counts.items())[:10])
    fix = ("the authors' split trains on the first 90% (rounded up) of each class's samples, so a class needs 10 or "
           'more to give the test split one; add samples' if cfg.dataset in EVENT_DATASET_NAMES and
           EVENT_DATASET_NAMES[cfg.dataset] == 'cifar10-dvs' else 'add samples to the empty split')
    empty = ' and '.join(kind for kind, split in splits.items() if not len(split))
    return f'the {empty} split of {cfg.dataset} in {cfg.data_dir} holds no samples (per class: {listed}): {fix}'


def _datasets(cfg, training):
    family = dataset_family(cfg.dataset)
    if family == 'cifar':
        name = CIFAR_NAMES[cfg.dataset]
        train = CIFAR(cfg.data_dir, name, train=True, transform=image_transforms(cfg, True),
                      download=cfg.download) if training else None
        evaluation = CIFAR(cfg.data_dir, name, train=False, transform=image_transforms(cfg, False),
                           download=cfg.download)
        return train, evaluation
    if family == 'imagenet':
        return image_folder_datasets(cfg.data_dir, image_transforms(cfg, True) if training else None,
                                     image_transforms(cfg, False), training)
    return build_event_datasets(cfg, EVENT_DATASET_NAMES[cfg.dataset], training)


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


def _mixup_arguments(cfg, num_classes):
    if not (cfg.mixup > 0 or cfg.cutmix > 0 or cfg.cutmix_minmax is not None):
        return None
    return dict(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, cutmix_minmax=cfg.cutmix_minmax, prob=cfg.mixup_prob,
                switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode, label_smoothing=cfg.smoothing,
                num_classes=num_classes)


class Batches:
    """The batches of one loader on the run's device, ready for the model: ``for images, targets in
    batches.epoch(epoch)``. Every random draw of an epoch follows from ``epoch_seed(epoch)``, so an
    epoch is the same whether or not the run was interrupted before it."""

    def __init__(self, loader, device, prefetcher=None, mixup=None, mixup_off_epoch=0):
        self.loader = loader
        self.device = device
        self.prefetcher = prefetcher
        self.mixup = mixup  # with a prefetcher, the loader's collate step (FastCollateMixup); else applied here
        self.mixup_off_epoch = mixup_off_epoch

    def __len__(self):
        return len(self.loader)

    @property
    def mixes(self):
        """Whether the targets are mixup's soft targets."""
        return self.mixup is not None

    def epoch(self, epoch=0, seed=None):
        if seed is not None:
            self.loader.sampler.set_epoch(epoch)
            self.loader.generator.manual_seed(seed)
        if self.mixup is not None:
            self.mixup.mixup_enabled = not (self.mixup_off_epoch and epoch >= self.mixup_off_epoch)
        if self.prefetcher is not None:
            yield from self.prefetcher
            return
        for images, targets in self.loader:
            images = images.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            if self.mixup is not None:
                images, targets = self.mixup(images, targets)
            yield images, targets


def _loader(cfg, dataset, batch_size, sampler, collate_fn, training):
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=cfg.workers,
                      pin_memory=cfg.pin_mem, drop_last=training, collate_fn=collate_fn, generator=torch.Generator(),
                      persistent_workers=False)


def build_train_batches(cfg, dataset, dist, device, num_classes):
    """Reshuffled every epoch, incomplete last batch dropped, mixup as the dataset's recipe applies it."""
    sampler = DistributedSampler(dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=cfg.seed,
                                 drop_last=True)
    if len(sampler) < cfg.batch_size:
        raise DatasetError(f'the training set has {len(dataset)} samples, fewer than one batch of {cfg.batch_size} '
                           f'per process ({dist.world_size} processes): lower --batch-size')
    mixup_arguments = _mixup_arguments(cfg, num_classes)
    if not _prefetches(cfg):
        mixup = Mixup(**mixup_arguments) if mixup_arguments else None
        return Batches(_loader(cfg, dataset, cfg.batch_size, sampler, None, True), device, mixup=mixup,
                       mixup_off_epoch=cfg.mixup_off_epoch)
    mixup = FastCollateMixup(**mixup_arguments) if mixup_arguments else None
    loader = _loader(cfg, dataset, cfg.batch_size, sampler, mixup or fast_collate, True)
    mean, std = _normalisation(cfg)
    prefetcher = PrefetchLoader(loader, mean, std, device=device, re_prob=cfg.reprob, re_mode=cfg.remode,
                                re_count=cfg.recount)
    return Batches(loader, device, prefetcher, mixup, cfg.mixup_off_epoch)


def build_eval_batches(cfg, dataset, dist, device, batch_size):
    """In order, split over the processes in whole batches (:class:`ShardSampler`)."""
    sampler = ShardSampler(len(dataset), dist.rank, dist.world_size, batch_size)
    if not _prefetches(cfg):
        return Batches(_loader(cfg, dataset, batch_size, sampler, None, False), device)
    loader = _loader(cfg, dataset, batch_size, sampler, fast_collate, False)
    return Batches(loader, device, PrefetchLoader(loader, *_normalisation(cfg), device=device))
