"""Train or evaluate SGLFormer on CIFAR100: `python cifar100/train.py [-c cifar100/cifar100.yml] [flags]` (see the README)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # also works from a checkout without pip install

from sglformer.training import main  # noqa: E402

if __name__ == '__main__':
    main(default_config=Path(__file__).with_name('cifar100.yml'), description=__doc__,
         defaults={'model': 'sglformer_cifar100'})
