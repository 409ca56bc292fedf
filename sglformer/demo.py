"""``make demo``: what a newcomer runs first, on the CPU in under a minute.

It prints the parameter table of every registered variant, writes a small learnable dataset in the real
CIFAR-10 pickle layout (one colour pattern per class, plus noise) under ``demo/``, trains a small
SGLFormer on it with ``cifar10/train.py``'s code, evaluates the best checkpoint, and says how long each
part took. The model's size was chosen with ``python -m sglformer.bench`` (docs/performance.md#tiny-models).
"""
import argparse
import contextlib
import importlib.resources
import shutil
import time
from pathlib import Path

from .logs import setup_logging
from .params import markdown_table, parameter_rows
from .testing import write_synthetic_cifar
from .training import main as train_main

# One time step and D=64: about 110 images/s on two cores, so five epochs take about 20 s.
SMALL_MODEL = ['--dim', '64', '--num-heads', '4', '-T', '1']


@contextlib.contextmanager
def timed(part, timings):
    start = time.perf_counter()
    yield
    timings.append((part, time.perf_counter() - start))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--folder', default='demo', help='where the synthetic data and the runs go')
    parser.add_argument('--epochs', type=int, default=5)
    cfg = parser.parse_args(argv)
    setup_logging()
    timings = []
    with timed('parameter table (12 variants, built without memory)', timings):
        print(markdown_table(parameter_rows()), flush=True)

    folder = Path(cfg.folder)
    shutil.rmtree(folder / 'runs', ignore_errors=True)  # the demo's own runs, so that it can run again
    data = folder / 'data'
    with timed('synthetic CIFAR-10 (400 training, 100 test images)', timings):
        write_synthetic_cifar(data, 'cifar10', train_per_class=40, test_per_class=10)
    recipe = importlib.resources.files('sglformer.variants.cifar10') / 'cifar10.yml'
    common = ['-c', str(recipe), '--data-dir', str(data), *SMALL_MODEL,
              '--workers', '0', '--no-download', '--output', str(folder / 'runs')]
    # The paper's recipe, shortened: no warm-up or cool-down, no mixup or heavy augmentation, a higher lr.
    with timed(f'training, {cfg.epochs} epochs', timings):
        train_main(common + ['--experiment', 'train', '--epochs', str(cfg.epochs), '--warmup-epochs', '0',
                             '--cooldown-epochs', '0', '-b', '32', '--lr', '5e-3', '--mixup', '0', '--aa', '',
                             '--reprob', '0'])
    best = folder / 'runs' / 'train' / 'model_best.pth.tar'
    print(f'\nEvaluating the best checkpoint ({best}):', flush=True)
    with timed('evaluation of the saved checkpoint', timings):
        train_main(common + ['--experiment', 'eval', '--eval', '--resume', str(best)])
    print('\n' + '\n'.join(f'{seconds:6.1f} s  {part}' for part, seconds in timings), flush=True)


if __name__ == '__main__':
    main()
