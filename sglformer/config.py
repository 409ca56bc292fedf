"""One option table for every training script: YAML file + command line -> one validated namespace.

Each option has one canonical name (its YAML key and ``args`` attribute) and every spelling the
authors' three scripts use for it: the CIFAR scripts' timm flags (``--batch-size``, ``-data-dir``),
the DVS scripts' (``--data-path``, ``--T``, ``--test-only``) and the ImageNet script's
(``--batch_size``, ``--nb_classes``). A dataset folder's YAML file holds its defaults; flags override it.
"""
import argparse
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A configuration file or value is wrong; the message says which and how to fix it."""


@dataclass(frozen=True)
class Option:
    name: str
    flags: tuple
    type: type = str
    default: object = None
    help: str = ''
    nargs: str = None
    choices: tuple = None
    aliases: tuple = field(default=())  # other YAML keys accepted for this option


def _opt(name, *flags, **kwargs):
    return Option(name, flags, **kwargs)


OPTIONS = (
    # model
    _opt('model', '--model', default='sglformer_cifar10', help='registered model name'),
    _opt('time_step', '-T', '--time-step', '--time_step', '--T', type=int, help='simulation time steps T'),
    _opt('T_train', '--T_train', '--T-train', type=int,
         help="DVS: frames to train on; must equal T, because the STB head's kernel spans exactly T steps"),
    _opt('layer', '-L', '--layer', type=int, help='number of blocks (the models\' "depths")'),
    _opt('dim', '--dim', type=int, help='embedding dimension D ("embed_dims")'),
    _opt('num_heads', '--num-heads', '--num_heads', type=int, help='attention heads'),
    _opt('patch_size', '--patch-size', '--patch_size', type=int, help='accepted for the authors\' files; unused'),
    _opt('mlp_ratio', '--mlp-ratio', '--mlp_ratio', type=float, help='MLP hidden size / D'),
    _opt('num_classes', '--num-classes', '--num_classes', '--nb_classes', type=int, aliases=('nb_classes',)),
    _opt('img_size', '--img-size', '--img_size', '--input-size', '--input_size', type=int,
         aliases=('input_size',), help='input height and width'),
    _opt('drop_path', '--drop-path', '--drop_path', type=float, help='accepted for the authors\' files; unused'),
    _opt('neuron', '--neuron', default='auto', choices=('auto', 'spikingjelly', 'fused'),
         help='LIF implementation; auto: spikingjelly with CuPy on CUDA where it works, fused otherwise'),
    _opt('neuron_backend', '--neuron-backend', '--neuron_backend', default='auto', choices=('auto', 'torch', 'cupy'),
         help="spikingjelly neurons' backend; auto: cupy on CUDA where it works, torch otherwise"),
    # data
    _opt('data_dir', '-data-dir', '--data-dir', '--data_dir', '--data-path', '--data_path', default='data',
         aliases=('data_path',), help='dataset folder'),
    _opt('dataset', '-d', '--dataset', default='torch/cifar10'),
    _opt('download', '--download', type=bool, default=True, help='download the dataset when it is absent'),
    _opt('mean', '--mean', type=float, nargs='+'),
    _opt('std', '--std', type=float, nargs='+'),
    _opt('crop_pct', '--crop-pct', '--crop_pct', type=float),
    _opt('interpolation', '--interpolation', default='bicubic'),
    _opt('train_interpolation', '--train-interpolation', '--train_interpolation', default='bicubic'),
    _opt('scale', '--scale', type=float, nargs='+', default=[0.08, 1.0]),
    _opt('ratio', '--ratio', type=float, nargs='+', default=[3. / 4., 4. / 3.]),
    _opt('hflip', '--hflip', type=float, default=0.5),
    _opt('vflip', '--vflip', type=float, default=0.0),
    _opt('color_jitter', '--color-jitter', '--color_jitter', type=float, default=0.4),
    _opt('aa', '--aa', help='timm auto-augment policy, e.g. rand-m9-n1-mstd0.4-inc1'),
    _opt('reprob', '--reprob', type=float, default=0.0),
    _opt('remode', '--remode', default='const'),
    _opt('recount', '--recount', type=int, default=1),
    _opt('batch_size', '-b', '--batch-size', '--batch_size', type=int, default=64, help='per process'),
    _opt('val_batch_size', '-vb', '--val-batch-size', '--val_batch_size', type=int, help='per process'),
    _opt('workers', '-j', '--workers', '--num_workers', '--num-workers', type=int, default=4, aliases=('num_workers',)),
    _opt('pin_mem', '--pin-mem', '--pin_mem', type=bool, default=False),
    # mixup and loss
    _opt('mixup', '--mixup', type=float, default=0.0),
    _opt('cutmix', '--cutmix', type=float, default=0.0),
    _opt('cutmix_minmax', '--cutmix-minmax', '--cutmix_minmax', type=float, nargs='+'),
    _opt('mixup_prob', '--mixup-prob', '--mixup_prob', type=float, default=1.0),
    _opt('mixup_switch_prob', '--mixup-switch-prob', '--mixup_switch_prob', type=float, default=0.5),
    _opt('mixup_mode', '--mixup-mode', '--mixup_mode', default='batch', choices=('batch', 'pair', 'elem')),
    _opt('mixup_off_epoch', '--mixup-off-epoch', '--mixup_off_epoch', type=int, default=0,
         help='epoch from which mixup/cutmix stop (0: never)'),
    _opt('smoothing', '--smoothing', type=float, default=0.1),
    # optimiser and schedule
    _opt('opt', '--opt', default='adamw'),
    _opt('opt_eps', '--opt-eps', '--opt_eps', type=float),
    _opt('opt_betas', '--opt-betas', '--opt_betas', type=float, nargs='+'),
    _opt('momentum', '--momentum', type=float, default=0.9),
    _opt('weight_decay', '--weight-decay', '--weight_decay', type=float, default=0.05),
    _opt('clip_grad', '--clip-grad', '--clip_grad', type=float),
    _opt('lr', '--lr', type=float, help='absolute learning rate'),
    _opt('blr', '--blr', type=float,
         help='base learning rate per 256 images: without lr, lr = blr x batch_size x accum_iter x processes / 256'),
    _opt('layer_decay', '--layer-decay', '--layer_decay', type=float,
         help='layer-wise learning-rate decay (BEiT style, see sglformer.optim); unset: timm\'s parameter groups'),
    _opt('min_lr', '--min-lr', '--min_lr', type=float, default=1e-5),
    _opt('warmup_lr', '--warmup-lr', '--warmup_lr', type=float, default=1e-5),
    _opt('warmup_epochs', '--warmup-epochs', '--warmup_epochs', type=int, default=0),
    _opt('cooldown_epochs', '--cooldown-epochs', '--cooldown_epochs', type=int, default=0),
    _opt('epochs', '--epochs', type=int, default=300),
    _opt('sched', '--sched', default='cosine',
         help="timm's scheduler, stepped per epoch, or halfcos: linear warm-up, then half a cosine to min_lr, "
              'set before every optimiser step'),
    _opt('accum_iter', '--accum-iter', '--accum_iter', type=int, default=1,
         help='micro-batches per optimiser step'),
    # run
    _opt('amp', '--amp', type=bool, default=False, help='fp16 autocast with a gradient scaler (CUDA only)'),
    _opt('device', '--device', help='default: cuda when available, else cpu'),
    _opt('local_rank', '--local-rank', '--local_rank', type=int,
         help='passed by torch.distributed.launch; unused (the LOCAL_RANK environment variable is read)'),
    _opt('seed', '--seed', type=int, default=42),
    _opt('output', '--output', '--output-dir', '--output_dir', default='output/train',
         aliases=('output_dir',), help='parent folder of run folders'),
    _opt('experiment', '--experiment', help='run folder name (default: run_name filled in)'),
    _opt('log_dir', '--log-dir', '--log_dir', help='TensorBoard folder (default: the run folder)'),
    _opt('run_name', '--run-name', '--run_name', default='{date}-{model}',
         help='template of the default run folder name, with option names in braces and {date}'),
    _opt('checkpoint_format', '--checkpoint-format', '--checkpoint_format', default='timm',
         choices=('timm', 'dvs', 'mae'), help="the authors' checkpoint container and file names to write"),
    _opt('resume', '--resume', help='checkpoint to continue from (or evaluate, with --eval)'),
    _opt('start_epoch', '--start-epoch', '--start_epoch', type=int, default=0,
         help='first epoch to train; with --resume the checkpoint\'s next epoch'),
    _opt('initial_checkpoint', '--initial-checkpoint', '--initial_checkpoint', '--finetune',
         aliases=('finetune',), help='weights to start from (a head of another shape is dropped)'),
    _opt('eval', '--eval', '--test-only', '--test_only', type=bool, default=False, aliases=('test_only',),
         help='only evaluate'),
    _opt('dist_eval', '--dist-eval', '--dist_eval', type=bool, default=False,
         help='accepted for the authors\' command lines: evaluation is always split over the processes in whole '
              'batches and gives the one-process result'),
    _opt('reference_eval_batch_size', '--reference-eval-batch-size', '--reference_eval_batch_size', type=int,
         help='evaluation batch size per process of the reference results; another one logs a warning'),
    _opt('checkpoint_hist', '--checkpoint-hist', '--checkpoint_hist', type=int, default=3,
         help='numbered checkpoints to keep'),
    _opt('log_interval', '--log-interval', '--log_interval', '--print-freq', '--print_freq', type=int, default=50,
         aliases=('print_freq',)),
)

OPTIONS_BY_NAME = {option.name: option for option in OPTIONS}
YAML_KEYS = {alias: option.name for option in OPTIONS for alias in (option.name, *option.aliases)}
_NUMBER = re.compile(r'[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?')


def build_parser(description):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument('-c', '--config', metavar='FILE', help='YAML file of defaults (keys are the option names)')
    for option in OPTIONS:
        kwargs = dict(dest=option.name, default=option.default, help=option.help or None)
        if option.type is bool:
            parser.add_argument(*option.flags, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            parser.add_argument(*option.flags, type=option.type, nargs=option.nargs, choices=option.choices, **kwargs)
    return parser


def coerce(name, value):
    """``value`` from a YAML file as the type of option ``name``; a clear error when it does not fit."""
    option = OPTIONS_BY_NAME[name]
    if value is None:
        return None
    if option.nargs:
        values = value if isinstance(value, (list, tuple)) else [value]
        return [_coerce_scalar(option, v) for v in values]
    return _coerce_scalar(option, value)


def _coerce_scalar(option, value):
    expected = option.type
    if expected is bool and isinstance(value, bool):
        return value
    if expected is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if expected is float and not isinstance(value, bool):
        if isinstance(value, (int, float)):
            return float(value)
        # PyYAML reads 1e-3 (no dot) as a string; the authors' files rely on argparse converting it.
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            return float(value)
    if expected is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        value = str(value)
        if option.choices and value not in option.choices:
            raise ConfigError(f"'{option.name}' must be one of {', '.join(option.choices)}, got {value!r}")
        return value
    raise ConfigError(f"'{option.name}' must be {_type_name(option)}, got {value!r} ({type(value).__name__})")


def _type_name(option):
    name = {bool: 'true or false', int: 'an integer', float: 'a number', str: 'a string'}[option.type]
    return f'a list of {name}s' if option.nargs else name


def read_config_file(path):
    """The validated option values of a YAML file, by canonical name."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f'config file {path} not found')
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, 'problem_mark', None)
        where = f' at line {mark.line + 1}, column {mark.column + 1}' if mark else ''
        raise ConfigError(f'{path} is not valid YAML{where}: {getattr(exc, "problem", None) or exc}') from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f'{path} must hold a mapping of option names to values, not a {type(raw).__name__}')
    values = {}
    for key, value in raw.items():
        if key not in YAML_KEYS:
            close = difflib.get_close_matches(str(key), list(YAML_KEYS), n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ''
            raise ConfigError(f'{path}: unknown key {key!r}{hint}')
        name = YAML_KEYS[key]
        try:
            values[name] = coerce(name, value)
        except ConfigError as exc:
            raise ConfigError(f'{path}: {exc}') from None
    return values


def parse_args(argv, default_config, description=None, defaults=None, add_arguments=None):
    """Defaults of the option table, then ``defaults``, then the YAML file (``-c`` or
    ``default_config``), then ``argv``. ``add_arguments(parser)`` adds a command's own flags."""
    parser = build_parser(description)
    if add_arguments is not None:
        add_arguments(parser)
    if defaults:
        parser.set_defaults(**defaults)
    pre, _ = parser.parse_known_args(argv)
    config_path = pre.config or default_config
    if config_path is not None:
        parser.set_defaults(**read_config_file(config_path))
    args = parser.parse_args(argv)
    args.config = str(config_path) if config_path is not None else None
    return args
