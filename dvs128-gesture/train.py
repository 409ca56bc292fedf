"""Train or evaluate SGLFormer on DVS128 Gesture: `python dvs128-gesture/train.py --T 10 --lr 5e-3 --data-path DIR` (see the README)."""
from pathlib import Path

from sglformer.training import main

if __name__ == '__main__':
    main(default_config=Path(__file__).with_name('dvs128-gesture.yml'), description=__doc__,
         defaults={'model': 'sglformer_dvs128gesture'})
