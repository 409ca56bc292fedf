"""Augmentation of event frames, the recipe of the authors' CIFAR10-DVS and DVS128 Gesture runs.

A sample is a float tensor ``[T, 2, H, W]`` of event counts, and all of its frames get the same
transformation: a horizontal flip with probability 0.5, then one operation drawn uniformly from
identity, shear along x, translation along x, translation along y, rotation and cutout. Shear,
translation and rotation take a magnitude drawn uniformly from 31 evenly spaced values in
``[-max, max]`` (shear 0.3, translation 5 pixels, rotation 30 degrees) whose sign is then flipped with
probability 0.5; they resample with nearest-neighbour interpolation and fill with 0 (no events).
Conventions of the authors' code, kept: the shear angle is ``degrees(magnitude)``, and a translation
is ``int(magnitude)`` pixels (truncated towards zero). Cutout is random erasing with probability 1 of
a square covering 0.1% to 11% of the frame, set to 0 in every frame and both polarities.

Every random number comes from torch's global generator, so the per-epoch seeding of the training
run (and DataLoader's seeding of its workers) makes the augmentation repeatable. Mixup is applied
to whole batches afterwards by the training engine.
"""
import math

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import RandomErasing
from torchvision.transforms.v2 import functional as F

OPERATIONS = ('identity', 'shear_x', 'translate_x', 'translate_y', 'rotate', 'cutout')


def apply_operation(frames, operation, magnitude=0.0):
    """``frames`` [..., H, W] under one of the deterministic operations, with a signed magnitude."""
    nearest = InterpolationMode.NEAREST
    if operation == 'identity':
        return frames
    if operation == 'shear_x':
        return F.affine(frames, angle=0.0, translate=[0, 0], scale=1.0, shear=[math.degrees(magnitude), 0.0],
                        interpolation=nearest)
    if operation in ('translate_x', 'translate_y'):
        shift = int(magnitude)
        translate = [shift, 0] if operation == 'translate_x' else [0, shift]
        return F.affine(frames, angle=0.0, translate=translate, scale=1.0, shear=[0.0, 0.0], interpolation=nearest)
    if operation == 'rotate':
        return F.rotate(frames, magnitude, interpolation=nearest)
    raise ValueError(f"unknown operation {operation!r}; known: {', '.join(OPERATIONS[:-1])} (cutout is random)")


class EventAugment:
    """The per-sample training augmentation of event frames ``[T, 2, H, W]`` (see the module docstring)."""

    def __init__(self, hflip=0.5, num_bins=31, max_shear=0.3, max_translate=5.0, max_rotate=30.0,
                 cutout_scale=(0.001, 0.11), cutout_ratio=(1.0, 1.0)):
        self.hflip = hflip
        self.magnitudes = {
            'shear_x': torch.linspace(-max_shear, max_shear, num_bins),
            'translate_x': torch.linspace(-max_translate, max_translate, num_bins),
            'translate_y': torch.linspace(-max_translate, max_translate, num_bins),
            'rotate': torch.linspace(-max_rotate, max_rotate, num_bins),
        }
        self.cutout = RandomErasing(p=1.0, scale=cutout_scale, ratio=cutout_ratio, value=0)

    def __call__(self, frames):
        if torch.rand(1).item() < self.hflip:
            frames = F.horizontal_flip(frames)
        operation = OPERATIONS[int(torch.randint(len(OPERATIONS), (1,)))]
        if operation == 'cutout':
            return self.cutout(frames)
        magnitude = 0.0
        if operation in self.magnitudes:
            bins = self.magnitudes[operation]
            magnitude = float(bins[int(torch.randint(len(bins), (1,)))])
            if torch.randint(2, (1,)):
                magnitude = -magnitude
        return apply_operation(frames, operation, magnitude)

    def __repr__(self):
        ranges = ', '.join(f'{name} ±{bins[-1].item():g}' for name, bins in self.magnitudes.items())
        return f'{type(self).__name__}(hflip={self.hflip}, {len(self.magnitudes["rotate"])} bins: {ranges}, cutout)'
