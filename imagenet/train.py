"""Train or evaluate SGLFormer on ImageNet-1K: `[torchrun ...] imagenet/train.py [-c imagenet.yml] [flags]` (see the README)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # also works from a checkout without pip install

from sglformer.training import main  # noqa: E402

if __name__ == '__main__':
    main(default_config=Path(__file__).with_name('imagenet.yml'), description=__doc__,
         defaults={'model': 'sglformer_ima_8_512'})
