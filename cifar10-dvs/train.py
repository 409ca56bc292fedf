"""Train or evaluate SGLFormer on CIFAR10-DVS: `python cifar10-dvs/train.py --T 10 --lr 5e-3 --data-path DIR` (see the README)."""
from pathlib import Path

from sglformer.training import main

if __name__ == '__main__':
    main(default_config=Path(__file__).with_name('cifar10-dvs.yml'), description=__doc__,
         defaults={'model': 'sglformer_cifar10dvs'})
