"""Firing rates, operation counts and theoretical energy of an SGLFormer: ``python -m sglformer.energy``.

docs/energy.md gives the conventions (what counts as a SOP or a MAC, how the attention products and the
residual sums of spikes are counted, what is left out) and the command's options. Use
:class:`EnergyMeter` around forward passes of your own, or :func:`measure` and :func:`summarize`; the
command wraps them with model building, inputs, a table, a JSON file and a bar chart.
"""
import argparse
import io
import itertools
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .build import EXPECTED_ERRORS, build_model, load_weights, model_family, resolve_device, synthetic_batches
from .config import COMMAND_LINE, ConfigError, check
from .config import parse_args as parse_options
from .data import build_datasets, build_eval_batches, dataset_family
from .distributed import DistInfo
from .files import write_file
from .layers import SpikeAttention, kv_first
from .logs import setup_logging
from .neuron import is_lif

_logger = logging.getLogger('sglformer.energy')  # also when run as __main__

E_MAC_PJ = 4.6
E_AC_PJ = 0.9
NONBINARY_CONVENTIONS = ('ac', 'mac')
SYNAPTIC_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)
PJ_TO_MJ = 1e-9
KIND_ORDER = ('spikes', 'counts', 'real')  # a layer's kind is the widest its inputs ever had


def firing_rate(x):
    """Share of non-zero elements of ``x``."""
    return x.count_nonzero().item() / x.numel()


def input_kind(x):
    """``'spikes'`` (only 0 and 1), ``'counts'`` (other non-negative integers) or ``'real'``."""
    if bool(((x == 0) | (x == 1)).all()):
        return 'spikes'
    if bool((x >= 0).all()) and bool((x == x.round()).all()):
        return 'counts'
    return 'real'


@dataclass
class NeuronRecord:
    """Spike counts of one LIF module, accumulated over forward passes."""
    name: str
    spikes_per_step: list  # one count per time step
    elements_per_step: int = 0
    flattened: bool = False  # ran on [T*B, ...]


@dataclass
class LayerRecord:
    """Input statistics and operation counts of one synaptic layer, summed over forward passes."""
    name: str
    type: str
    nonzero: int = 0
    elements: int = 0
    flops: int = 0
    sops: float = 0.0  # accumulates if every input is counted as AC
    kind: str = 'spikes'
    operands: dict = field(default_factory=dict)  # attention: 'q'/'k'/'v' -> (nonzero, elements)
    association: str = ''  # attention: which product is computed first


def _fan_in(module):
    if isinstance(module, nn.Linear):
        return module.in_features
    return module.in_channels // module.groups * math.prod(module.kernel_size)


def attention_ops(q, k, v, num_heads):
    """``(flops, sops, association)`` of one :func:`~sglformer.layers.spike_attention` call.

    ``q, k, v`` are ``[T, B, C, N]``. FLOPs are the dense multiply-accumulates of the association the
    model uses; SOPs count the non-zero pairs of the first product and, for the second, the row
    length for every non-zero element of its spike operand (see the module docstring).
    """
    steps, batch, channels, tokens = q.shape
    head_dim = channels // num_heads
    q, k, v = ((t != 0).reshape(steps, batch, num_heads, head_dim, tokens).long() for t in (q, k, v))
    if kv_first(head_dim, tokens):  # M = kᵀ v (pairs share a token), then q M (a row of d per q spike)
        flops = steps * batch * num_heads * 2 * tokens * head_dim * head_dim
        sops = (k.sum(3) * v.sum(3)).sum().item() + q.sum().item() * head_dim
        return flops, sops, '(k^T v) first'
    # S = q kᵀ (pairs share a channel), then S v (a row of N per v spike)
    flops = steps * batch * num_heads * 2 * tokens * tokens * head_dim
    sops = (q.sum(4) * k.sum(4)).sum().item() + v.sum().item() * tokens
    return flops, sops, '(q k^T) first'


class EnergyMeter:
    """Forward hooks that record firing rates and operation counts while the context is active.

    ``with EnergyMeter(model) as meter: model(x)``; the hooks only read tensors, so outputs do not
    change, and they are removed on exit. ``time_steps`` defaults to ``model.T``. The batch size is
    taken from the first dimension of the model's input (images ``[B, C, H, W]`` or frames
    ``[B, T, C, H, W]``).
    """

    def __init__(self, model, time_steps=None):
        self.model = model
        self.time_steps = model.T if time_steps is None else time_steps
        self.neurons = {}
        self.layers = {}
        self.images = 0
        self._batch = None
        self._handles = []

    def __enter__(self):
        if self._handles:
            raise RuntimeError('this EnergyMeter is already attached')
        self._handles.append(self.model.register_forward_pre_hook(self._count_images))
        for name, module in self.model.named_modules():
            if is_lif(module):
                self.neurons[name] = NeuronRecord(name, [0] * self.time_steps)
                self._handles.append(module.register_forward_hook(self._neuron_hook(name)))
            elif isinstance(module, (*SYNAPTIC_LAYERS, SpikeAttention)):
                self.layers[name] = LayerRecord(name, type(module).__name__)
                self._handles.append(module.register_forward_hook(self._layer_hook(name)))
        return self

    def __exit__(self, *exc_info):
        self.remove()

    def remove(self):
        """Detach every hook (also done on leaving the ``with`` block)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _count_images(self, module, args):
        self._batch = args[0].shape[0]
        self.images += self._batch

    def _neuron_hook(self, name):
        def hook(module, args, output):
            record = self.neurons[name]
            steps = self.time_steps
            if output.shape[0] not in (steps, steps * self._batch):
                raise RuntimeError(f'neuron {name}: output {tuple(output.shape)} is neither [T={steps}, ...] '
                                   f'nor [T*B={steps * self._batch}, ...]')
            record.flattened |= output.shape[0] != steps
            per_step = output.detach().reshape(steps, -1)  # t-major [T*B, ...] reads as [T, B, ...]
            counts = per_step.count_nonzero(dim=1).tolist()
            record.spikes_per_step = [a + b for a, b in zip(record.spikes_per_step, counts)]
            record.elements_per_step += per_step.shape[1]
        return hook

    def _layer_hook(self, name):
        def hook(module, args, output):
            record = self.layers[name]
            inputs = [a.detach() for a in args]
            if isinstance(module, SpikeAttention):
                flops, sops, record.association = attention_ops(*inputs, module.num_heads)
                for operand, tensor in zip('qkv', inputs):
                    nonzero, elements = record.operands.get(operand, (0, 0))
                    record.operands[operand] = (nonzero + tensor.count_nonzero().item(), elements + tensor.numel())
            else:
                flops = output.numel() * _fan_in(module)
                sops = flops * firing_rate(inputs[0])
            record.nonzero += sum(t.count_nonzero().item() for t in inputs)
            record.elements += sum(t.numel() for t in inputs)
            record.flops += flops
            record.sops += sops
            if record.kind != 'real':
                record.kind = max([record.kind, *map(input_kind, inputs)], key=KIND_ORDER.index)
        return hook


def measure(model: nn.Module, batches, time_steps: int = None) -> 'EnergyMeter':
    """Run ``model`` in eval mode without gradients over ``batches`` (an iterable of inputs) under an
    :class:`EnergyMeter`; the model's train/eval mode is restored afterwards. Returns the meter."""
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device('cpu')
    was_training = model.training
    model.eval()
    try:
        with EnergyMeter(model, time_steps) as meter, torch.no_grad():
            for index, batch in enumerate(batches, 1):
                model(batch.to(device))
                _logger.info('batch %d: %d images measured', index, meter.images)
    finally:
        model.train(was_training)
    return meter


def summarize(meter: 'EnergyMeter', e_mac: float = E_MAC_PJ, e_ac: float = E_AC_PJ, nonbinary_as: str = 'ac') -> dict:
    """The report of a meter as a JSON-ready dict; operation counts and energies are per image."""
    if nonbinary_as not in NONBINARY_CONVENTIONS:
        raise ValueError(f"nonbinary_as must be one of {', '.join(NONBINARY_CONVENTIONS)}, got {nonbinary_as!r}")
    if not meter.images:
        raise ValueError('no forward pass was recorded: run the model inside the EnergyMeter first')
    images = meter.images
    neurons = []
    for record in meter.neurons.values():
        if not record.elements_per_step:
            continue  # a neuron the forward never calls
        per_step = [s / record.elements_per_step for s in record.spikes_per_step]
        neurons.append(dict(name=record.name, firing_rate=sum(per_step) / len(per_step),
                            firing_rate_per_step=per_step, layout='[T*B, ...]' if record.flattened else '[T, B, ...]'))
    layers = []
    for record in meter.layers.values():
        if not record.elements:
            continue
        as_ac = record.kind == 'spikes' or (record.kind == 'counts' and nonbinary_as == 'ac')
        flops = record.flops / images
        sops = record.sops / images if as_ac else 0.0
        macs = 0.0 if as_ac else flops
        entry = dict(name=record.name, type=record.type, input_kind=record.kind, binary=record.kind == 'spikes',
                     input_rate=record.nonzero / record.elements, flops=flops, counted_as='AC' if as_ac else 'MAC',
                     macs=macs, sops=sops, energy_mj=(e_mac * macs + e_ac * sops) * PJ_TO_MJ)
        if record.operands:
            entry.update({f'{name}_rate': nonzero / elements for name, (nonzero, elements) in record.operands.items()})
            entry['association'] = record.association
        layers.append(entry)
    macs = sum(layer['macs'] for layer in layers)
    sops = sum(layer['sops'] for layer in layers)
    spikes = sum(sum(r.spikes_per_step) for r in meter.neurons.values())
    elements = sum(r.elements_per_step * len(r.spikes_per_step) for r in meter.neurons.values())
    return dict(
        images=images, time_steps=meter.time_steps, e_mac_pj=e_mac, e_ac_pj=e_ac, nonbinary_as=nonbinary_as,
        totals=dict(flops=sum(layer['flops'] for layer in layers), macs=macs, sops=sops,
                    mac_energy_mj=e_mac * macs * PJ_TO_MJ, ac_energy_mj=e_ac * sops * PJ_TO_MJ,
                    energy_mj=(e_mac * macs + e_ac * sops) * PJ_TO_MJ,
                    mean_firing_rate=spikes / elements if elements else 0.0),
        convention=dict(
            flops='multiply-accumulates per image over all time steps as executed (T x FLOPs of one step '
                  'for per-step layers); bias not counted',
            sops='AC layers: input non-zero rate x FLOPs; attention: exact non-zero pairs of the first '
                 'product + spikes x row length of the second',
            energy='E = E_MAC x MACs + E_AC x SOPs, mJ per image; BN, pooling, neuron updates, residual '
                   'additions not counted'),
        neurons=neurons, layers=layers)


def format_report(report):
    """The report as plain-text tables."""
    neurons, layers, totals = report['neurons'], report['layers'], report['totals']
    width = max(len(entry['name']) for entry in neurons + layers)
    lines = [f"Firing rates of {len(neurons)} spiking neurons ({report['images']} images, "
             f"T={report['time_steps']}; rate = share of non-zero outputs)",
             f"{'neuron':<{width}}  {'rate':>6}  per time step"]
    for entry in neurons:
        steps = ' '.join(f'{r:.3f}' for r in entry['firing_rate_per_step'])
        flag = '  (ran on [T*B, ...])' if entry['layout'] == '[T*B, ...]' else ''
        lines.append(f"{entry['name']:<{width}}  {entry['firing_rate']:6.3f}  {steps}{flag}")
    lines += ['', f"Synaptic layers (per image; FLOPs over all T steps; 'counts' inputs taken as "
                  f"{report['nonbinary_as'].upper()})",
              f"{'layer':<{width}}  {'type':<14} {'input':<7} {'rate':>6} {'FLOPs (M)':>11} {'as':>3} "
              f"{'MACs (M)':>10} {'SOPs (M)':>10} {'E (uJ)':>9}"]
    for entry in layers:
        lines.append(f"{entry['name']:<{width}}  {entry['type']:<14} {entry['input_kind']:<7} "
                     f"{entry['input_rate']:6.3f} {entry['flops'] / 1e6:11.3f} {entry['counted_as']:>3} "
                     f"{entry['macs'] / 1e6:10.3f} {entry['sops'] / 1e6:10.3f} {entry['energy_mj'] * 1e3:9.3f}")
    lines += ['',
              f"Total per image: FLOPs {totals['flops'] / 1e9:.4f} G, MACs {totals['macs'] / 1e9:.4f} G, "
              f"SOPs {totals['sops'] / 1e9:.4f} G, mean firing rate {totals['mean_firing_rate']:.4f}",
              f"Energy per image: {totals['energy_mj']:.4f} mJ = {report['e_mac_pj']} pJ x MACs "
              f"({totals['mac_energy_mj']:.4f} mJ) + {report['e_ac_pj']} pJ x SOPs ({totals['ac_energy_mj']:.4f} mJ)"]
    return '\n'.join(lines)


def plot_firing_rates(report, path):
    """A horizontal bar chart of every neuron's firing rate (bars) and its per-step rates (dots), as a PNG file."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    neurons = report['neurons']
    rows = range(len(neurons))
    fig, ax = plt.subplots(figsize=(8, 1.5 + 0.22 * len(neurons)))
    ax.barh(rows, [n['firing_rate'] for n in neurons], color='tab:blue', label='mean over time steps')
    for row, entry in zip(rows, neurons):
        ax.plot(entry['firing_rate_per_step'], [row] * report['time_steps'], '.', color='tab:orange', markersize=4)
    ax.plot([], [], '.', color='tab:orange', label='per time step')
    ax.set_yticks(list(rows), [n['name'] for n in neurons], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel('firing rate (share of non-zero outputs)')
    ax.set_title(f"{report.get('model', 'model')}: firing rates, {report['images']} images, T={report['time_steps']}, "
                 f"{report['totals']['energy_mj']:.4f} mJ per image", fontsize=9)
    ax.legend(fontsize=7, loc='lower right')
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format='png', dpi=120)
    plt.close(fig)
    write_file(path, image.getvalue())


def tensor_batches(path, batches, batch_size):
    """Batches of the inputs saved in ``path`` (one tensor, samples along the first dimension)."""
    try:
        inputs = torch.load(path, map_location='cpu', weights_only=True)
    except OSError as exc:
        raise ConfigError(f'--input {path}: {exc.strerror}') from None
    except Exception as exc:  # not a torch.save file, truncated, or holding Python objects
        raise ConfigError(f'--input {path} is not a torch.save file of one tensor: {str(exc).strip()[:200]}') from None
    if not isinstance(inputs, torch.Tensor):
        raise ConfigError(f'{path} holds a {type(inputs).__name__}; save one tensor of inputs with torch.save')
    chunks = inputs.split(batch_size)[:batches]
    if len(chunks) < batches:
        _logger.info('%s holds %d inputs: %d batches instead of %d', path, len(inputs), len(chunks), batches)
    return chunks


def dataset_batches(cfg, device):
    """The images of the first ``cfg.batches`` batches of the evaluation split, on ``device`` and
    normalised, as the evaluation of a training run reads them."""
    _, eval_set = build_datasets(cfg, training=False)
    batches = build_eval_batches(cfg, eval_set, DistInfo(), device, cfg.batch_size)
    return (images for images, _ in itertools.islice(batches.epoch(), cfg.batches))


class _RemovedFlag(argparse.Action):
    """A flag of earlier versions: one clear error saying what replaced it, not argparse's 'ambiguous option'."""

    def __call__(self, parser, namespace, values, option_string=None):
        raise ConfigError(f'{option_string} is gone: load weights with --resume PATH (or --initial-checkpoint PATH), '
                          'as the training scripts do')


def _add_energy_arguments(parser):
    group = parser.add_argument_group('energy report')
    group.add_argument('--checkpoint', action=_RemovedFlag, help=argparse.SUPPRESS)
    group.add_argument('--input', type=Path, default=None,
                       help='a torch.save file holding one tensor of inputs [N, ...] (default: the dataset that -c or '
                            '--data-dir names, else synthetic inputs)')
    group.add_argument('--batches', type=int, default=1, help='number of batches (default 1)')
    group.add_argument('--json', type=Path, default=None, help='write the report here')
    group.add_argument('--png', type=Path, default=None, help='write a bar chart of the firing rates here')
    group.add_argument('--e-mac', type=float, default=E_MAC_PJ, help='energy of a MAC in pJ (default 4.6)')
    group.add_argument('--e-ac', type=float, default=E_AC_PJ, help='energy of an AC in pJ (default 0.9)')
    group.add_argument('--nonbinary-as', choices=NONBINARY_CONVENTIONS, default='ac',
                       help="how layers whose input is a sum of spikes are counted: ac (default) as accumulates "
                            "at the non-zero rate, as the papers' formulas do; mac as MACs, as the Spikingformer "
                            "energy script does by default")


# Options that act on one kind of input only; given on the command line for another, they are refused.
INPUT_OPTIONS = {
    'dataset': ('data_dir', 'dataset', 'download', 'mean', 'std', 'crop_pct', 'interpolation', 'workers'),
    'synthetic': ('seed',),
}
INPUT_NAMES = {'file': 'an --input file', 'dataset': "a dataset's evaluation split", 'synthetic': 'synthetic inputs'}


def parse_args(argv=None):
    """The training scripts' options plus the report's own, as a read-only Config; the options shared
    with training are checked by :func:`report_energy`, once the model and the input are known."""
    cfg = parse_options(argv, None, __doc__, defaults=dict(model=None, data_dir=None, batch_size=8, seed=0,
                                                           workers=0), add_arguments=_add_energy_arguments,
                        commands=('energy',))
    if cfg.model is None:
        raise ConfigError('name the model: --model sglformer_cifar10 (or a YAML file with -c that names one)')
    if cfg.batches < 1:
        raise ConfigError(f'--batches must be at least 1, got {cfg.batches}')
    for flag, value in (('--e-mac', cfg.e_mac), ('--e-ac', cfg.e_ac)):
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f'{flag} is an energy in pJ and must be a finite number >= 0, got {value}')
    return cfg


def input_kind_of(cfg):
    """``'file'`` (``--input``), ``'dataset'`` (a ``data_dir`` from ``-c``'s YAML file or ``--data-dir``,
    with a named dataset) or ``'synthetic'``."""
    if cfg.input is not None:
        if cfg.source('data_dir') == COMMAND_LINE:
            raise ConfigError('--input and --data-dir both name the inputs: pass one')
        return 'file'
    if cfg.data_dir is None:
        return 'synthetic'
    if cfg.source('dataset') is None:
        raise ConfigError("reading a dataset needs its options (dataset, image size, normalisation): add the "
                          "dataset folder's YAML file, e.g. -c cifar10/cifar10.yml")
    return 'dataset'


def refuse_unused_input_options(cfg, kind):
    """Options of the other kinds of input (:data:`INPUT_OPTIONS`) are errors on the command line; a
    YAML file, written for training too, may hold them."""
    for other, names in INPUT_OPTIONS.items():
        given = [name for name in names if cfg.source(name) == COMMAND_LINE]
        if other != kind and given:
            listed = ', '.join(f"'{name}'" for name in given)
            acts, them = ('acts', 'it') if len(given) == 1 else ('act', 'them')
            raise ConfigError(f'{listed} (on the command line) only {acts} when the report reads {INPUT_NAMES[other]}, '
                              f'and it reads {INPUT_NAMES[kind]}: remove {them}')


def main(argv: list = None) -> dict:
    """Run the command; returns the report. Expected problems end in one clear message (exit 2)."""
    setup_logging()
    try:
        return report_energy(parse_args(argv))
    except EXPECTED_ERRORS as exc:
        _logger.error('error: %s', exc)
        sys.exit(2)


def report_energy(cfg) -> dict:
    """Check ``cfg`` for the command 'energy', build the model, load its weights, measure it on the
    chosen input, print the report and write the files asked for; returns the report."""
    kind = input_kind_of(cfg)
    refuse_unused_input_options(cfg, kind)
    family = dataset_family(cfg.dataset) if kind == 'dataset' else model_family(cfg.model)
    check(cfg, 'energy', family)
    device = resolve_device(cfg.device)
    cfg = cfg.replace(device=str(device))
    model = build_model(cfg)
    weights = cfg.resume or cfg.initial_checkpoint
    if weights:
        load_weights(model, weights)
        _logger.info('loaded the weights of %s', weights)
    else:
        _logger.warning('no weights given (--resume PATH): measuring the randomly initialised model, whose firing '
                        'rates say little about a trained one')
    if kind == 'file':
        batches, source = tensor_batches(cfg.input, cfg.batches, cfg.batch_size), str(cfg.input)
    elif kind == 'dataset':
        batches, source = dataset_batches(cfg, device), f'{cfg.dataset} evaluation split in {cfg.data_dir}'
    else:
        batches = synthetic_batches(model, cfg.batches, cfg.batch_size, cfg.seed)
        source = f'synthetic, seed {cfg.seed}'
    report = summarize(measure(model, batches), cfg.e_mac, cfg.e_ac, cfg.nonbinary_as)
    report = dict(model=cfg.model, checkpoint=weights, input=source, **report)
    print(format_report(report))
    if cfg.json:
        write_file(cfg.json, json.dumps(report, indent=1).encode())
        _logger.info('wrote %s', cfg.json)
    if cfg.png:
        plot_firing_rates(report, cfg.png)
        _logger.info('wrote %s', cfg.png)
    return report


if __name__ == '__main__':
    main()
