"""YAML file + command line -> checked, read-only :class:`Config`, for every command, from the option table
of :mod:`sglformer.options`. A dataset folder's YAML file holds its defaults; flags override it. :func:`check`
refuses values out of range and options the command or dataset does not use (docs/configuration.md lists
them all), and warns about the authors' flags that change nothing.
"""
import argparse
import difflib
import logging
import math
import re
from pathlib import Path

import yaml

from .options import AUTHORS_FLAGS, COMMANDS, OPTIONS, OPTIONS_BY_NAME, PATCH_SIZES, SGD_LIKE, YAML_KEYS

_logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A configuration file or value is wrong; the message says which and how to fix it."""


_NUMBER = re.compile(r'[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?')
COMMAND_LINE = 'the command line'
AUTHORS_DEST = 'authors '  # the parser's destination of an authors' flag: this and its first spelling


class Config:
    """Option values by name, read-only once made: ``cfg.lr``, ``cfg.to_dict()``,
    ``cfg.replace(lr=...)`` (a new Config), and ``cfg.source(name)``: where a value was set."""

    __slots__ = ('_values', '_sources')

    def __init__(self, values: dict, sources: dict = None):
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

    def to_dict(self) -> dict:
        return dict(self._values)

    def source(self, name: str):
        """``'the command line'``, a YAML file's path, or None for a default."""
        return self._sources.get(name)

    def replace(self, **changes) -> 'Config':
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
            if option.negations:
                parser.add_argument(*option.negations, dest=option.name, action='store_false', help=argparse.SUPPRESS)
        else:
            parser.add_argument(*option.flags, type=option.type, nargs=option.nargs, choices=option.choices, **kwargs)
    for authors in AUTHORS_FLAGS:
        kwargs = dict(action='store_true') if authors.nargs == 0 else dict(nargs=authors.nargs)
        parser.add_argument(*authors.flags, dest=AUTHORS_DEST + authors.flags[0], help=argparse.SUPPRESS, **kwargs)
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
        raise ConfigError(f"config file {path} {'is a folder' if path.is_dir() else 'not found'}")
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
    authors = {name[len(AUTHORS_DEST):]: given.pop(name) for name in list(given) if name.startswith(AUTHORS_DEST)}
    config_path = given.pop('config', None) or default_config
    file_values = read_config_file(config_path) if config_path is not None else {}
    values = {option.name: option.default for option in OPTIONS}
    values.update(defaults or {})
    values.update(file_values)
    values.update(given)
    sources = {name: str(config_path) for name in file_values}
    sources.update({name: COMMAND_LINE for name in given if name in OPTIONS_BY_NAME})
    values['config'] = str(config_path) if config_path is not None else None
    values['authors_flags'] = authors  # the authors' flags that no option takes, checked by check()
    return Config(values, sources)


RUN_KINDS = {'train': 'a training run', 'eval': 'an evaluation (--eval)', 'energy': 'the energy report'}


def _where(cfg, name):
    source = cfg.source(name)
    if source == COMMAND_LINE:
        return f' ({_flag(name)} on the command line)'
    return f' (in {source})' if source else ''


def _flag(name):
    flags = OPTIONS_BY_NAME[name].flags
    return next((f for f in flags if f.startswith('--')), flags[0])


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
        if command == 'eval' and 'train' in option.commands:
            return option.name  # accepted with a warning: the authors' scripts ignore training flags in an evaluation
        raise ConfigError(f"'{option.name}' does not apply here{_where(cfg, option.name)}: it is used by "
                          f"{' and '.join(RUN_KINDS[c] for c in option.commands)} only, and this is "
                          f'{RUN_KINDS[command]}. Remove it')
    if option.ignored and command in option.commands:
        _logger.warning("'%s' has no effect%s: %s (the authors' scripts accept it likewise)", option.name,
                        _where(cfg, option.name), option.ignored)
    return None


def _check_authors_flags(cfg, family):
    """The authors' flags that no option takes: a warning for those that change nothing here (nor in the
    authors' runs), an error for the others."""
    for authors in AUTHORS_FLAGS:
        if authors.flags[0] not in cfg.authors_flags:
            continue
        if authors.ignored and family in authors.ignored_for:
            _logger.warning("%s has no effect: %s (the authors' scripts accept it likewise)", authors.flags[0],
                            authors.ignored)
        else:
            raise ConfigError(f'{authors.flags[0]} is not supported: '
                              f"{authors.refused or f'no script of the authors for {family} data has it'}")


def _check_combinations(cfg, command, family):
    problems = []
    if cfg.patch_size is not None and cfg.patch_size != PATCH_SIZES[family]:
        problems.append(f"'patch_size' is {cfg.patch_size}{_where(cfg, 'patch_size')}, but the tokenizer of the "
                        f'{family} models has a total stride of {PATCH_SIZES[family]}: remove patch_size')
    if command == 'train':
        for name in ('warmup_lr', 'cooldown_epochs') if cfg.sched == 'halfcos' else ():
            if cfg.source(name) == COMMAND_LINE:
                problems.append(f"'{name}' does not apply to sched halfcos (a linear warm-up from 0, no cool-down)")
            elif cfg.source(name):  # a YAML file written for another schedule
                _logger.warning("'%s'%s has no effect with sched halfcos (a linear warm-up from 0, no cool-down)",
                                name, _where(cfg, name))
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
    for name in ('scale', 'ratio', 'cutmix_minmax'):  # (min, max) pairs; cutmix draws from between them
        low, high = getattr(cfg, name) or (0, 1)
        if low > high or (name == 'cutmix_minmax' and low == high):
            problems.append(f"'{name}' is a (min, max) range, got {getattr(cfg, name)}{_where(cfg, name)}")
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
    training_only = []
    for option in OPTIONS:
        _check_value(cfg, option)
        training_only.append(_check_applies(cfg, option, command, family))
    _check_authors_flags(cfg, family)
    _check_combinations(cfg, command, family)
    training_only = [_flag(name) for name in training_only if name]
    if training_only:
        _logger.warning("%s: training options, no effect on an evaluation (the authors' scripts accept them likewise)",
                        ', '.join(training_only))
    return cfg
