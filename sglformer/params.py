"""``python -m sglformer.params``: every registered variant's parameter count beside the paper's."""
import argparse

import timm
import torch

from .models import count_parameters
from .variants import load_variants

# (registered name, keyword arguments, paper's model name, paper's parameter count, paper's top-1).
# None where the paper has no row for a registered variant.
PUBLISHED = (
    ('sglformer_ima2_8_384', {}, 'SGLFormer-8-384', '16.25M', 79.44),
    ('sglformer_ima2_8_512', {}, 'SGLFormer-8-512', '28.67M', 82.28),
    ('sglformer_ima2_8_768', {}, None, None, None),
    ('sglformer_ima_8_384', {}, None, None, None),
    ('sglformer_ima_8_512', {}, 'SGLFormer-8-512*', '28.67M', 81.93),
    ('sglformer_ima_8_768', {}, 'SGLFormer-8-768*', '64.02M', 83.73),
    ('sglformer_cifar10', {}, 'SGLFormer-4-384', '8.85M', 96.76),
    ('sglformer_cifar100', {}, 'SGLFormer-4-384', '8.88M', 82.26),
    ('sglformer_cifar10dvs', {'T': 10}, 'SGLFormer-3-256', '2.48M', 82.9),
    ('sglformer_cifar10dvs', {'T': 16}, 'SGLFormer-3-256', '2.58M', 82.6),
    ('sglformer_dvs128gesture', {'T': 10}, 'SGLFormer-3-256', '2.08M', 97.2),
    ('sglformer_dvs128gesture', {'T': 16}, 'SGLFormer-3-256', '2.17M', 98.6),
)


def parameter_rows():
    load_variants()
    rows = []
    for name, kwargs, paper_name, paper_params, top1 in PUBLISHED:
        with torch.device('meta'):  # shapes only: full-size models cost no memory or time
            model = timm.create_model(name, **kwargs)
        count = count_parameters(model)
        rows.append(dict(variant=name, T=model.T, params=count, params_m=f'{count / 1e6:.3f}M',
                         paper_model=paper_name or '-', paper_params=paper_params or '-',
                         top1='-' if top1 is None else f'{top1:.2f}'))
    return rows


def markdown_table(rows):
    header = ('| variant | T | parameters (ours) | paper model | paper parameters | paper top-1 |',
              '| --- | --- | --- | --- | --- | --- |')
    body = [f"| `{r['variant']}` | {r['T']} | {r['params']:,} ({r['params_m']}) | {r['paper_model']} | "
            f"{r['paper_params']} | {r['top1']} |" for r in rows]
    return '\n'.join(header + tuple(body))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)
    print(markdown_table(parameter_rows()))


if __name__ == '__main__':
    main()
