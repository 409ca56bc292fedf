"""One option table for every command: YAML file + command line -> checked, read-only :class:`Config`.

Each option has one canonical name (its YAML key and attribute) and every spelling the authors' three
scripts use for it: the CIFAR scripts' timm flags (``--batch-size``, ``-data-dir``), the DVS scripts'
(``--data-path``, ``--T``, ``--test-only``) and the ImageNet script's (``--batch_size``, ``--nb_classes``).
A dataset folder's YAML file holds its defaults; flags override it. :func:`check` refuses values out of
range and options the command or dataset does not use (docs/configuration.md lists them all).
"""
import argparse
import difflib
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

_logger = logging.getLogger(__name__)

COMMANDS = ('train', 'eval', 'energy')
FAMILIES = ('cifar', 'imagenet', 'events')  # kinds of dataset, see sglformer.data.dataset_family
RUNS = ('train', 'eval')
IMAGES = ('cifar', 'imagenet')
PATCH_SIZES = {'cifar': 4, 'imagenet': 16, 'events': 16}  # the tokenizers' total strides
SGD_LIKE = ('sgd', 'nesterov', 'momentum', 'sgdp', 'rmsprop', 'rmsproptf', 'lars', 'lamb')


class ConfigError(ValueError):
    """A configuration file or value is wrong; the message says which and how to fix it."""


@dataclass(frozen=True)
class Range:
    low: float = None
    high: float = None
    open_low: bool = False

    def contains(self, value):
        if self.low is not None and (value < self.low or (self.open_low and value == self.low)):
            return False
        return self.high is None or value <= self.high

    def __str__(self):
        if self.high is not None:
            return f"{'greater than' if self.open_low else 'from'} {self.low:g} {'and at most' if self.open_low else 'to'} {self.high:g}"
        return f"{'greater than' if self.open_low else 'at least'} {self.low:g}"


COUNT = Range(1)
NONNEGATIVE = Range(0)
POSITIVE = Range(0, open_low=True)
PROBABILITY = Range(0, 1)
SHARE = Range(0, 1, open_low=True)


@dataclass(frozen=True)
class Option:
    name: str
    flags: tuple
    type: type = str
    default: object = None
    help: str = ''
    nargs: object = None  # '+' or an exact count
    choices: tuple = None
    aliases: tuple = ()  # other YAML keys accepted for this option
    range: Range = None
    commands: tuple = COMMANDS  # the commands that use it
    families: tuple = FAMILIES  # the kinds of dataset it applies to
    ignored: str = ''  # the authors' scripts accept it and do nothing with it: why ours does not either


def _opt(name, *flags, **kwargs):
    return Option(name, flags, **kwargs)


def _train(name, *flags, **kwargs):
    return Option(name, flags, commands=('train',), **kwargs)


OPTIONS = (
    # model
    _opt('model', '--model', default='sglformer_cifar10', help='registered model name'),
    _opt('time_step', '-T', '--time-step', '--time_step', '--T', type=int, range=COUNT,
         help='simulation time steps T (frames per sample on event data)'),
    _train('T_train', '--T_train', '--T-train', type=int, range=COUNT, families=('events',),
           help="frames to train on; must equal T, because the STB head's kernel spans exactly T steps"),
    _opt('layer', '-L', '--layer', type=int, range=COUNT, help='blocks (the models\' "depths")'),
    _opt('dim', '--dim', type=int, range=COUNT, help='embedding dimension D ("embed_dims")'),
    _opt('num_heads', '--num-heads', '--num_heads', type=int, range=COUNT, help='attention heads'),
    _opt('patch_size', '--patch-size', '--patch_size', type=int, range=COUNT,
         help="the tokenizer's total stride (4 on CIFAR, 16 on event data and ImageNet): checked, not chosen"),
    _opt('mlp_ratio', '--mlp-ratio', '--mlp_ratio', type=float, range=POSITIVE, help='MLP hidden size / D'),
    _opt('num_classes', '--num-classes', '--num_classes', '--nb_classes', type=int, range=COUNT, aliases=('nb_classes',)),
    _opt('img_size', '--img-size', '--img_size', '--input-size', '--input_size', type=int, range=COUNT,
         aliases=('input_size',), help='input height and width'),
    _train('drop_path', '--drop-path', '--drop_path', type=float, range=PROBABILITY, families=('imagenet',),
           ignored='these models have no drop path'),
    _opt('neuron', '--neuron', default='auto', choices=('auto', 'spikingjelly', 'fused'),
         help='LIF implementation; auto: the fastest exact one that works on the device (docs/neurons.md)'),
    _opt('neuron_backend', '--neuron-backend', '--neuron_backend', default='auto',
         help="spikingjelly neurons' kernels: torch or cupy (spikingjelly 0.0.0.0.14), torch, triton or cuda "
              "(spikingjelly 2, checked against its own choice); auto: the fastest that works (docs/neurons.md)"),
    # data
    _opt('data_dir', '-data-dir', '--data-dir', '--data_dir', '--data-path', '--data_path', default='data',
         aliases=('data_path',), help='dataset folder'),
    _opt('dataset', '-d', '--dataset', default='torch/cifar10'),
    _opt('download', '--download', type=bool, default=True, families=('cifar',),
         help='download the dataset when it is absent'),
    _opt('mean', '--mean', type=float, nargs=3, families=IMAGES, help='normalisation mean (default: ImageNet\'s)'),
    _opt('std', '--std', type=float, nargs=3, range=POSITIVE, families=IMAGES,
         help='normalisation std (default: ImageNet\'s)'),
    _opt('crop_pct', '--crop-pct', '--crop_pct', type=float, range=SHARE, families=IMAGES,
         help='evaluation: resize to img_size / crop_pct, then centre crop (default 0.875)'),
    _opt('interpolation', '--interpolation', default='bicubic', families=IMAGES),
    _train('train_interpolation', '--train-interpolation', '--train_interpolation', default='bicubic', families=IMAGES),
    _train('scale', '--scale', type=float, nargs=2, range=SHARE, default=[0.08, 1.0], families=IMAGES),
    _train('ratio', '--ratio', type=float, nargs=2, range=POSITIVE, default=[3. / 4., 4. / 3.], families=IMAGES),
    _train('hflip', '--hflip', type=float, range=PROBABILITY, default=0.5),
    _train('vflip', '--vflip', type=float, range=PROBABILITY, default=0.0, families=IMAGES),
    _train('color_jitter', '--color-jitter', '--color_jitter', type=float, range=NONNEGATIVE, default=0.4,
           families=IMAGES),
    _train('aa', '--aa', families=IMAGES, help='timm auto-augment policy, e.g. rand-m9-n1-mstd0.4-inc1'),
    _train('reprob', '--reprob', type=float, range=PROBABILITY, default=0.0, families=IMAGES),
    _train('remode', '--remode', default='const', choices=('const', 'rand', 'pixel'), families=IMAGES),
    _train('recount', '--recount', type=int, range=COUNT, default=1, families=IMAGES),
    _opt('batch_size', '-b', '--batch-size', '--batch_size', type=int, range=COUNT, default=64, help='per process'),
    _opt('val_batch_size', '-vb', '--val-batch-size', '--val_batch_size', type=int, range=COUNT,
         commands=RUNS, help='per process (default: batch_size)'),
    _opt('workers', '-j', '--workers', '--num_workers', '--num-workers', type=int, range=NONNEGATIVE, default=4,
         aliases=('num_workers',)),
    _opt('pin_mem', '--pin-mem', '--pin_mem', type=bool, default=False, commands=RUNS),
    _train('max_unreadable_samples', '--max-unreadable-samples', type=int, range=NONNEGATIVE, default=0,
           help='training samples whose file cannot be read that are skipped with a warning before the run '
                'stops (0: stop at the first)'),
    # mixup and loss
    _train('mixup', '--mixup', type=float, range=NONNEGATIVE, default=0.0),
    _train('cutmix', '--cutmix', type=float, range=NONNEGATIVE, default=0.0),
    _train('cutmix_minmax', '--cutmix-minmax', '--cutmix_minmax', type=float, nargs=2, range=SHARE),
    _train('mixup_prob', '--mixup-prob', '--mixup_prob', type=float, range=PROBABILITY, default=1.0),
    _train('mixup_switch_prob', '--mixup-switch-prob', '--mixup_switch_prob', type=float, range=PROBABILITY, default=0.5),
    _train('mixup_mode', '--mixup-mode', '--mixup_mode', default='batch', choices=('batch', 'pair', 'elem')),
    _train('mixup_off_epoch', '--mixup-off-epoch', '--mixup_off_epoch', type=int, range=NONNEGATIVE, default=0,
           help='epoch from which mixup/cutmix stop (0: never)'),
    _train('smoothing', '--smoothing', type=float, range=Range(0, 1), default=0.1),
    # optimiser and schedule
    _train('opt', '--opt', default='adamw'),
    _train('opt_eps', '--opt-eps', '--opt_eps', type=float, range=POSITIVE),
    _train('opt_betas', '--opt-betas', '--opt_betas', type=float, nargs=2, range=Range(0, 1)),
    _train('momentum', '--momentum', type=float, range=Range(0, 1), default=0.9,
           help='SGD-style optimisers only'),
    _train('weight_decay', '--weight-decay', '--weight_decay', type=float, range=NONNEGATIVE, default=0.05),
    _train('clip_grad', '--clip-grad', '--clip_grad', type=float, range=POSITIVE),
    _train('lr', '--lr', type=float, range=POSITIVE, help='absolute learning rate'),
    _train('blr', '--blr', type=float, range=POSITIVE,
           help='base learning rate per 256 images: without lr, lr = blr x batch_size x accum_iter x processes / 256'),
    _train('layer_decay', '--layer-decay', '--layer_decay', type=float, range=SHARE, families=('imagenet',),
           ignored="the authors' layer-decay rule gives every parameter of these models the full learning rate"),
    _train('min_lr', '--min-lr', '--min_lr', type=float, range=NONNEGATIVE, default=1e-5),
    _train('warmup_lr', '--warmup-lr', '--warmup_lr', type=float, range=NONNEGATIVE, default=1e-5),
    _train('warmup_epochs', '--warmup-epochs', '--warmup_epochs', type=int, range=NONNEGATIVE, default=0),
    _train('cooldown_epochs', '--cooldown-epochs', '--cooldown_epochs', type=int, range=NONNEGATIVE, default=0),
    _train('epochs', '--epochs', type=int, range=COUNT, default=300),
    _train('sched', '--sched', default='cosine', choices=('cosine', 'tanh', 'step', 'multistep', 'poly', 'halfcos'),
           help="timm's scheduler, stepped per epoch, or halfcos: linear warm-up, then half a cosine to min_lr, "
                'set before every optimiser step'),
    _train('accum_iter', '--accum-iter', '--accum_iter', type=int, range=COUNT, default=1,
           help='micro-batches per optimiser step'),
    # run
    _train('amp', '--amp', type=bool, default=False, help='fp16 autocast with a gradient scaler (CUDA only)'),
    _opt('eval_amp', '--eval-amp', '--eval_amp', type=bool, commands=RUNS,
         help='evaluate under fp16 autocast (CUDA only; default: as amp)'),
    _opt('device', '--device', help='default: cuda when available, else cpu'),
    _opt('local_rank', '--local-rank', '--local_rank', type=int, commands=RUNS,
         help='passed by torch.distributed.launch; the LOCAL_RANK environment variable is what is read'),
    _opt('dist_timeout', '--dist-timeout', '--dist_timeout', type=float, range=POSITIVE, default=30.0, commands=RUNS,
         help='minutes a process waits for the others before the run ends with an error'),
    _opt('seed', '--seed', type=int, range=NONNEGATIVE, default=42),
    _opt('output', '--output', '--output-dir', '--output_dir', default='output/train', commands=RUNS,
         aliases=('output_dir',), help='parent folder of run folders'),
    _opt('experiment', '--experiment', commands=RUNS, help='run folder name (default: run_name filled in)'),
    _train('log_dir', '--log-dir', '--log_dir', help='TensorBoard folder (default: the run folder)'),
    _opt('run_name', '--run-name', '--run_name', default='{date}-{model}', commands=RUNS,
         help='template of the default run folder name, with option names in braces and {date}'),
    _train('checkpoint_format', '--checkpoint-format', '--checkpoint_format', default='timm',
           choices=('timm', 'dvs', 'mae'), help="the authors' checkpoint container and file names to write"),
    _opt('resume', '--resume', help='checkpoint to continue from (with --eval: to evaluate)'),
    _train('start_epoch', '--start-epoch', '--start_epoch', type=int, range=NONNEGATIVE, default=0,
           help='first epoch to train when not resuming'),
    _opt('initial_checkpoint', '--initial-checkpoint', '--initial_checkpoint', '--finetune', aliases=('finetune',),
         help='weights to start from (a classifier of another shape is dropped)'),
    _opt('eval', '--eval', '--test-only', '--test_only', type=bool, default=False, aliases=('test_only',),
         commands=RUNS, help='only evaluate'),
    _opt('dist_eval', '--dist-eval', '--dist_eval', type=bool, default=False, commands=RUNS,
         help="the authors' flag: evaluation is always split over the processes, in whole batches"),
    _opt('reference_eval_batch_size', '--reference-eval-batch-size', '--reference_eval_batch_size', type=int,
         range=COUNT, commands=RUNS,
         help='evaluation batch size per process of the reference results; another one logs a warning'),
    _train('checkpoint_hist', '--checkpoint-hist', '--checkpoint_hist', type=int, range=COUNT,
           help='timm checkpoint layout: how many of the best numbered checkpoints to keep (default 10)'),
    _opt('log_interval', '--log-interval', '--log_interval', '--print-freq', '--print_freq', type=int, range=COUNT,
         default=50, aliases=('print_freq',), commands=RUNS),
)

OPTIONS_BY_NAME = {option.name: option for option in OPTIONS}
YAML_KEYS = {alias: option.name for option in OPTIONS for alias in (option.name, *option.aliases)}
_NUMBER = re.compile(r'[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?')
COMMAND_LINE = 'the command line'


class Config:
    """Option values by name, read-only once made: ``cfg.lr``, ``cfg.to_dict()``,
    ``cfg.replace(lr=...)`` (a new Config), and ``cfg.source(name)``: where a value was set."""

    __slots__ = ('_values', '_sources')

    def __init__(self, values, sources=None):
        object.__setattr__(self, '_values', dict(values))
        object.__setattr__(self, '_sources', dict(sources or {}))

    def __getattr__(self, name):
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f'no option {name!r}') from None

    def __setattr__(self, name, value):
        raise AttributeError(f'a Config is read-only; make a changed copy with replace({name}=...)')

    def __repr__(self):
        return f'Config({self._values!r})'

    def to_dict(self):
        return dict(self._values)

    def source(self, name):
        """``'the command line'``, a YAML file's path, or None for a default."""
        return self._sources.get(name)

    def replace(self, **changes):
        return Config({**self._values, **changes}, self._sources)


def build_parser(description, commands=COMMANDS):
    """The option table as flags; ``-h`` lists those that ``commands`` use."""
    # Nothing but what is given lands in the namespace, so that the sources of values are known.
    parser = argparse.ArgumentParser(description=description, argument_default=argparse.SUPPRESS)
    parser.add_argument('-c', '--config', metavar='FILE', help='YAML file of defaults (keys are the option names)')
    for option in OPTIONS:
        shown = set(option.commands) & set(commands)
        kwargs = dict(dest=option.name, help=(option.help or None) if shown else argparse.SUPPRESS)
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
    """The option values of a YAML file, by canonical name."""
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
        raise ConfigError(f'{path} is empty: a config file holds "option: value" lines, as the dataset folders\' '
                          'YAML files do (for example cifar10/cifar10.yml)')
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


def parse_args(argv, default_config, description=None, defaults=None, add_arguments=None, commands=COMMANDS):
    """The option table's defaults, then ``defaults``, then the YAML file (``-c`` or ``default_config``),
    then ``argv``, as a :class:`Config` that knows where each value came from (not yet checked: see
    :func:`check`). ``add_arguments(parser)`` adds a command's own flags, with their own defaults;
    ``commands``: those the caller runs, whose options ``-h`` lists."""
    parser = build_parser(description, commands)
    if add_arguments is not None:
        add_arguments(parser)
    given = vars(parser.parse_args(argv))
    config_path = given.pop('config', None) or default_config
    file_values = read_config_file(config_path) if config_path is not None else {}
    values = {option.name: option.default for option in OPTIONS}
    values.update(defaults or {})
    values.update(file_values)
    values.update(given)
    sources = {name: str(config_path) for name in file_values}
    sources.update({name: COMMAND_LINE for name in given if name in OPTIONS_BY_NAME})
    values['config'] = str(config_path) if config_path is not None else None
    return Config(values, sources)


RUN_KINDS = {'train': 'a training run', 'eval': 'an evaluation (--eval)', 'energy': 'the energy report'}


def _where(cfg, name):
    source = cfg.source(name)
    if source == COMMAND_LINE:
        flags = OPTIONS_BY_NAME[name].flags
        return f" ({next((f for f in flags if f.startswith('--')), flags[0])} on the command line)"
    return f' (in {source})' if source else ''


def _check_value(cfg, option):
    value = getattr(cfg, option.name)
    if value is None:
        return
    values = value if option.nargs else [value]
    if isinstance(option.nargs, int) and len(values) != option.nargs:
        raise ConfigError(f"'{option.name}' takes {option.nargs} values, got {len(values)}{_where(cfg, option.name)}")
    if option.range is not None and not all(isinstance(v, (int, float)) and math.isfinite(v)
                                            and option.range.contains(v) for v in values):
        raise ConfigError(f"'{option.name}' must be {option.range}, got {value}{_where(cfg, option.name)}")


def _check_applies(cfg, option, command, family):
    """An option set for a command or dataset that does not use it is refused (unless it only comes from
    a YAML file written for other commands too); one that the authors' scripts accept and do nothing
    with is named in a warning."""
    source = cfg.source(option.name)
    if source is None:
        return
    if family not in option.families and (source == COMMAND_LINE or command in option.commands):
        raise ConfigError(f"'{option.name}' does not apply here{_where(cfg, option.name)}: it is for "
                          f"{' and '.join(option.families)} data, and {cfg.dataset} is {family} data. Remove it")
    if command not in option.commands and source == COMMAND_LINE:
        raise ConfigError(f"'{option.name}' does not apply here{_where(cfg, option.name)}: it is used by "
                          f"{' and '.join(RUN_KINDS[c] for c in option.commands)} only, and this is "
                          f'{RUN_KINDS[command]}. Remove it')
    if option.ignored and command in option.commands:
        _logger.warning("'%s' has no effect%s: %s (the authors' scripts accept it likewise)", option.name,
                        _where(cfg, option.name), option.ignored)


def _check_combinations(cfg, command, family):
    problems = []
    if cfg.patch_size is not None and cfg.patch_size != PATCH_SIZES[family]:
        problems.append(f"'patch_size' is {cfg.patch_size}{_where(cfg, 'patch_size')}, but the tokenizer of the "
                        f'{family} models has a total stride of {PATCH_SIZES[family]}: remove patch_size')
    if command == 'train':
        if cfg.sched == 'halfcos':
            problems += [f"'{name}' does not apply to sched halfcos (a linear warm-up from 0)"
                         for name in ('warmup_lr', 'cooldown_epochs') if cfg.source(name)]
        if cfg.lr is not None and cfg.blr is not None and cfg.source('blr'):
            problems.append(f"both lr ({cfg.lr:g}) and blr ({cfg.blr:g}) are set and lr would win: set lr to null to "
                            'use blr, or pass --lr')
        if cfg.lr is None and cfg.blr is None:
            problems.append('no learning rate: set lr or blr in the YAML file or pass --lr or --blr')
        if cfg.start_epoch and cfg.start_epoch >= cfg.epochs:
            problems.append(f"'start_epoch' {cfg.start_epoch} must be below 'epochs' {cfg.epochs}")
        if cfg.source('checkpoint_hist') and cfg.checkpoint_format != 'timm':
            problems.append(f"'checkpoint_hist' applies to the timm checkpoint layout only, not {cfg.checkpoint_format}")
        if cfg.source('momentum') and cfg.opt.lower().split('_')[-1] not in SGD_LIKE:
            _logger.warning("'momentum' has no effect with opt %s (the authors' scripts accept it likewise)", cfg.opt)
        mixes = cfg.mixup > 0 or cfg.cutmix > 0 or cfg.cutmix_minmax is not None
        if mixes and cfg.batch_size % 2:
            problems.append(f"'batch_size' must be even with mixup or cutmix (they pair image i with image B-1-i), "
                            f'got {cfg.batch_size}')
        if cfg.T_train is not None and cfg.T_train != cfg.time_step:
            problems.append(f"'T_train' {cfg.T_train} with T {cfg.time_step}: the STB head (full_size_conv) has a kernel "
                            'spanning exactly T time steps, so the model cannot train on other frame counts than it is '
                            f"evaluated on (the authors' script fails the same way); pass --T {cfg.T_train} to train "
                            f'and evaluate on {cfg.T_train} frames')
    if cfg.resume and cfg.initial_checkpoint:
        problems.append('both resume and initial_checkpoint are set: pass one')
    if command == 'eval' and not (cfg.resume or cfg.initial_checkpoint):
        problems.append('--eval needs weights: pass --resume PATH or --initial-checkpoint PATH')
    if problems:
        raise ConfigError('; '.join(problems))


def check(cfg, command, family):
    """Refuse values out of range and options that ``command`` (train, eval or energy) on a dataset of
    ``family`` (cifar, imagenet or events) does not use; returns ``cfg``. Model options that only the
    model can judge (heads dividing the width, depth limits) are checked when the model is built."""
    for option in OPTIONS:
        _check_value(cfg, option)
        _check_applies(cfg, option, command, family)
    _check_combinations(cfg, command, family)
    return cfg
