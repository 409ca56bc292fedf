"""The option table: values out of range, options a run does not use, and what the authors' scripts
accepted and ignored, all refused (or warned about) before anything runs."""
import logging

import pytest

from conftest import REPO_ROOT
from sglformer.config import Config, ConfigError, check, parse_args

FOLDER_FAMILIES = {'cifar10': 'cifar', 'cifar100': 'cifar', 'cifar10-dvs': 'events', 'dvs128-gesture': 'events',
                   'imagenet': 'imagenet'}


def checked(folder, *argv, command='train'):
    cfg = parse_args(list(argv), REPO_ROOT / folder / f'{folder}.yml')
    return check(cfg, command, FOLDER_FAMILIES[folder])


@pytest.mark.parametrize('folder', FOLDER_FAMILIES)
def test_every_folder_recipe_passes_its_own_checks_without_warnings(folder, caplog):
    with caplog.at_level(logging.WARNING, logger='sglformer'):
        checked(folder)
        checked(folder, '--eval', '--resume', 'weights.pth', command='eval')
    assert not caplog.records


@pytest.mark.parametrize('argv, key, allowed', [
    (['-b', '-8'], 'batch_size', 'at least 1'),
    (['--epochs', '0'], 'epochs', 'at least 1'),
    (['-T', '0'], 'time_step', 'at least 1'),
    (['--dim', '0'], 'dim', 'at least 1'),
    (['--lr=-1e-3'], 'lr', 'greater than 0'),
    (['--reprob', '1.5'], 'reprob', 'from 0 to 1'),
    (['--smoothing', '1.5'], 'smoothing', 'from 0 to 1'),
    (['--crop-pct', '0'], 'crop_pct', 'greater than 0 and at most 1'),
    (['--workers', '-1'], 'workers', 'at least 0'),
    (['--accum-iter', '0'], 'accum_iter', 'at least 1'),
    (['--dist-timeout', '0'], 'dist_timeout', 'greater than 0'),
    (['--lr', 'nan'], 'lr', 'greater than 0'),
])
def test_out_of_range_values_name_the_key_the_range_and_the_source(argv, key, allowed):
    with pytest.raises(ConfigError) as error:
        checked('cifar10', *argv)
    message = str(error.value)
    assert f"'{key}' must be {allowed}" in message and 'on the command line' in message


def test_a_yaml_value_out_of_range_names_the_file(tmp_path):
    config = tmp_path / 'mine.yml'
    config.write_text('lr: 1e-3\nbatch_size: 0\n')
    with pytest.raises(ConfigError, match=r"'batch_size' must be at least 1, got 0 \(in .*mine.yml\)"):
        check(parse_args(['-c', str(config)], None), 'train', 'cifar')


def test_empty_yaml_file_is_an_error(tmp_path):
    empty = tmp_path / 'empty.yml'
    empty.write_text('# nothing but a comment\n')
    with pytest.raises(ConfigError, match='empty.yml is empty'):
        parse_args(['-c', str(empty)], None)


def test_partial_yaml_file_takes_the_table_defaults(tmp_path):
    partial = tmp_path / 'partial.yml'
    partial.write_text('lr: 2.0e-3\n')
    cfg = check(parse_args(['-c', str(partial)], None), 'train', 'cifar')
    assert cfg.lr == 2e-3 and cfg.batch_size == 64 and cfg.mean is None  # None: timm's ImageNet mean


@pytest.mark.parametrize('folder, argv, words', [
    ('cifar10-dvs', ['--aa', 'rand-m9-mstd0.5'], "'aa' does not apply here"),
    ('cifar10-dvs', ['--reprob', '0.25'], "'reprob' does not apply here"),
    ('cifar10-dvs', ['--mean', '0.5', '0.5', '0.5'], "'mean' does not apply here"),
    ('dvs128-gesture', ['--color-jitter', '0.4'], "'color_jitter' does not apply here"),
    ('dvs128-gesture', ['--interpolation', 'bilinear'], "'interpolation' does not apply here"),
    ('cifar10', ['--T_train', '4'], "'T_train' does not apply here"),
    ('imagenet', ['--download'], "'download' does not apply here"),
    ('imagenet', ['--warmup_lr', '1e-6'], "'warmup_lr' does not apply to sched halfcos"),
    ('imagenet', ['--cooldown-epochs', '5'], "'cooldown_epochs' does not apply to sched halfcos"),
    ('cifar10', ['--blr', '1e-3'], 'both lr (0.001) and blr (0.001) are set'),
    ('cifar10-dvs', ['--checkpoint-hist', '3'], "'checkpoint_hist' applies to the timm checkpoint layout only"),
    ('cifar10', ['--patch-size', '16'], "'patch_size' is 16"),
    ('cifar10', ['--resume', 'a.pth', '--initial-checkpoint', 'b.pth'], 'both resume and initial_checkpoint'),
    ('cifar10-dvs', ['--T', '16', '--T_train', '8'], "'T_train' 8 with T 16"),
    ('cifar10', ['-b', '15'], "'batch_size' must be even with mixup"),
])
def test_options_that_would_be_ignored_are_refused(folder, argv, words):
    with pytest.raises(ConfigError, match=words.replace('(', r'\(').replace(')', r'\)')):
        checked(folder, *argv)


def test_training_flags_are_refused_by_an_evaluation_but_the_recipe_yaml_is_not():
    checked('cifar10', '--eval', '--resume', 'w.pth', command='eval')  # the YAML's lr, mixup ... are fine
    with pytest.raises(ConfigError, match=r"'lr' does not apply here \(--lr on the command line\).*an evaluation"):
        checked('cifar10', '--eval', '--resume', 'w.pth', '--lr', '1e-3', command='eval')
    with pytest.raises(ConfigError, match='--eval needs weights'):
        checked('cifar10', '--eval', command='eval')


@pytest.mark.parametrize('folder, argv, option', [
    ('cifar10', ['--momentum', '0.8'], 'momentum'),
    ('imagenet', ['--layer_decay', '0.75'], 'layer_decay'),
    ('imagenet', ['--drop_path', '0.1'], 'drop_path'),
])
def test_what_the_authors_accepted_and_ignored_gets_one_warning(folder, argv, option, caplog):
    with caplog.at_level(logging.WARNING, logger='sglformer'):
        checked(folder, *argv)
    assert len(caplog.records) == 1 and f"'{option}' has no effect" in caplog.records[0].getMessage()


def test_the_authors_cifar_yaml_with_patch_size_passes(tmp_path):
    config = tmp_path / 'cifar10.yml'
    config.write_text((REPO_ROOT / 'cifar10' / 'cifar10.yml').read_text() + 'patch_size: 4\n')
    check(parse_args(['-c', str(config)], None), 'train', 'cifar')


def test_a_config_is_read_only_and_knows_its_sources():
    cfg = parse_args(['--epochs', '3'], REPO_ROOT / 'cifar10' / 'cifar10.yml')
    with pytest.raises(AttributeError, match='read-only'):
        cfg.epochs = 4
    assert cfg.source('epochs') == 'the command line'
    assert cfg.source('lr').endswith('cifar10.yml') and cfg.source('momentum') is None
    changed = cfg.replace(epochs=5)
    assert (changed.epochs, cfg.epochs) == (5, 3) and isinstance(changed, Config)
