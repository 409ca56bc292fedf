"""``make demo``: what a newcomer runs first, on the CPU in a few minutes.

1. Builds every registered variant (shapes only) and prints the parameter table.
2. Writes a small, learnable synthetic dataset in the real CIFAR-10 pickle layout (one colour
   pattern per class, plus noise) under ``demo/``, trains a small SGLFormer on it with
   ``cifar10/train.py``'s code for a few epochs, then evaluates the best checkpoint.
"""
import argparse
import shutil
from pathlib import Path

from .data.cifar import write_synthetic_cifar
from .logs import setup_logging
from .params import markdown_table, parameter_rows
from .training import main as train_main
from .variants import REPO_ROOT

SMALL_MODEL = ['--dim', '48', '--num-heads', '4', '-T', '1']


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--folder', default='demo', help='where the synthetic data and the run go')
    parser.add_argument('--epochs', type=int, default=6)
    args = parser.parse_args(argv)
    setup_logging()
    print(markdown_table(parameter_rows()), flush=True)

    folder = Path(args.folder)
    shutil.rmtree(folder / 'runs', ignore_errors=True)  # the demo's own scratch runs, so that it can run again
    data = folder / 'data'
    write_synthetic_cifar(data, 'cifar10', train_per_class=40, test_per_class=10)
    config = str(REPO_ROOT / 'cifar10' / 'cifar10.yml')
    common = ['-c', config, '--data-dir', str(data), *SMALL_MODEL, '--workers', '0', '--no-download',
              '--output', str(folder / 'runs')]
    # The paper's recipe, shortened: no warm-up or cool-down, no mixup or heavy augmentation, a higher lr.
    train_main(common + ['--experiment', 'train', '--epochs', str(args.epochs), '--warmup-epochs', '0',
                         '--cooldown-epochs', '0', '-b', '32', '--lr', '5e-3', '--mixup', '0', '--aa', '',
                         '--reprob', '0'])
    print(f'\nEvaluating the best checkpoint ({folder / "runs" / "train" / "model_best.pth.tar"}):', flush=True)
    train_main(common + ['--experiment', 'eval', '--eval', '--resume', str(folder / 'runs' / 'train' / 'model_best.pth.tar')])


if __name__ == '__main__':
    main()
