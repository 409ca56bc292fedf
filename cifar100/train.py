"""Train or evaluate SGLFormer on CIFAR100: `python cifar100/train.py [-c cifar100/cifar100.yml] [flags]` (see the README)."""
from pathlib import Path

from sglformer.training import main

if __name__ == '__main__':
    main(default_config=Path(__file__).with_name('cifar100.yml'), description=__doc__,
         defaults={'model': 'sglformer_cifar100'})
