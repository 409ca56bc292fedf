"""Train or evaluate SGLFormer on CIFAR10: `python cifar10/train.py [-c cifar10/cifar10.yml] [flags]` (see the README)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # also works from a checkout without pip install

from sglformer.training import main  # noqa: E402

if __name__ == '__main__':
    main(default_config=Path(__file__).with_name('cifar10.yml'), description=__doc__,
         defaults={'model': 'sglformer_cifar10'})
