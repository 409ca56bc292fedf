"""Train or evaluate SGLFormer on ImageNet-1K: `[torchrun ...] imagenet/train.py [-c imagenet.yml] [flags]` (see the README)."""
from pathlib import Path

from sglformer.training import main

if __name__ == '__main__':
    main(default_config=Path(__file__).with_name('imagenet.yml'), description=__doc__,
         defaults={'model': 'sglformer_ima_8_512'})
