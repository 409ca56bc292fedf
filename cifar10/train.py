"""Train or evaluate SGLFormer on CIFAR10: `python cifar10/train.py [-c cifar10/cifar10.yml] [flags]` (see the README)."""
from pathlib import Path

from sglformer.training import main

if __name__ == '__main__':
    main(default_config=Path(__file__).with_name('cifar10.yml'), description=__doc__,
         defaults={'model': 'sglformer_cifar10'})
