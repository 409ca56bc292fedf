"""``make demo``: what a newcomer runs first.

Builds every registered variant (shapes only), prints the parameter table, then runs one forward
pass of a small CIFAR-10 SGLFormer on the CPU.
"""
import time

import timm
import torch

from .logs import setup_logging
from .models import count_parameters
from .params import markdown_table, parameter_rows


def main():
    setup_logging()
    print(markdown_table(parameter_rows()))
    model = timm.create_model('sglformer_cifar10', embed_dims=96, num_heads=8, T=2).eval()
    images = torch.rand(4, 3, 32, 32)
    start = time.perf_counter()
    with torch.no_grad():
        logits = model(images)
    print(f'\nsglformer_cifar10 (D=96, T=2, {count_parameters(model):,} parameters): '
          f'{tuple(images.shape)} -> {tuple(logits.shape)} in {time.perf_counter() - start:.2f} s on the CPU')


if __name__ == '__main__':
    main()
