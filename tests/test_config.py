"""The option table: values out of range, options a run does not use, and what the authors' scripts
accepted and ignored, all refused (or warned about) before anything runs."""
import logging

import pytest

from conftest import REPO_ROOT
from sglformer.config import Config, ConfigError, build_parser, check, parse_args

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


@pytest.mark.parametrize('name, words', [('missing.yml', 'missing.yml not found'), ('.', 'is a folder')])
def test_a_config_path_that_is_no_file_is_an_error(tmp_path, name, words):
    with pytest.raises(ConfigError, match=words):
        parse_args(['-c', str(tmp_path / name)], None)


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
    ('cifar10', ['--cutmix-minmax', '0.9', '0.1'], "'cutmix_minmax' is a (min, max) range, got"),
    ('imagenet', ['--scale', '1', '0.5'], "'scale' is a (min, max) range"),
    ('imagenet', ['--ratio', '1.5', '0.5'], "'ratio' is a (min, max) range"),
])
def test_options_that_would_be_ignored_are_refused(folder, argv, words):
    with pytest.raises(ConfigError, match=words.replace('(', r'\(').replace(')', r'\)')):
        checked(folder, *argv)


def test_a_yaml_file_for_another_schedule_is_not_refused_for_halfcos(caplog):
    with caplog.at_level(logging.WARNING, logger='sglformer'):
        cfg = checked('cifar10', '--sched', 'halfcos')
    assert cfg.sched == 'halfcos' and sorted(r.getMessage().split("'")[1] for r in caplog.records) == [
        'cooldown_epochs', 'warmup_lr']
    assert all('cifar10.yml) has no effect with sched halfcos' in r.getMessage() for r in caplog.records)


def test_an_evaluation_warns_once_about_training_flags_as_the_authors_scripts_ignore_them(caplog):
    with caplog.at_level(logging.WARNING, logger='sglformer'):
        checked('cifar10', '--eval', '--resume', 'w.pth', '--lr', '1e-3', '--warmup-epochs', '3', command='eval')
    assert [r.getMessage() for r in caplog.records] == [
        "--lr, --warmup-epochs: training options, no effect on an evaluation (the authors' scripts accept them "
        'likewise)']
    with pytest.raises(ConfigError, match='--eval needs weights'):
        checked('cifar10', '--eval', command='eval')
    with pytest.raises(ConfigError, match=r"'lr' does not apply here \(--lr on the command line\).*energy report"):
        check(parse_args(['--lr', '1e-3'], REPO_ROOT / 'cifar10' / 'cifar10.yml'), 'energy', 'cifar')


@pytest.mark.parametrize('folder, flags, warned', [
    ('cifar10', ['--acratio', '0.5', '--pretrained', '--drop', '0.1', '--bn-eps', '1e-5'], 4),
    ('cifar100', ['--gp', 'avg', '--epoch-repeats', '2', '--jsd', '--drop-path', '0.1'], 4),
    ('cifar10-dvs', ['--tb', '--connect_f', 'ADD', '--world-size', '2', '--dist-url', 'env://'], 4),
    ('imagenet', ['--resplit', '--global_pool', '--cls_token', '--world_size', '8', '--dist_url', 'env://'], 5),
])
def test_the_authors_flags_that_change_nothing_are_accepted_with_a_warning(folder, flags, warned, caplog):
    with caplog.at_level(logging.WARNING, logger='sglformer'):
        checked(folder, *flags)
    assert len(caplog.records) == warned and all('has no effect' in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize('folder, flags, words', [
    ('cifar10', ['--resplit'], 'random erasing that spares half of each batch'),
    ('cifar10', ['--aug-splits', '3'], 'augmentation splits (AugMix)'),
    ('cifar10', ['--channels-last'], 'channels-last'),
    ('cifar10', ['--tta', '2'], 'test-time augmentation'),
    ('dvs128-gesture', ['--sync-bn'], 'synchronised BatchNorm'),
    ('imagenet', ['--dist_on_itp'], 'torchrun'),
    ('imagenet', ['--val-split', 'test'], "'val_split' does not apply here"),
])
def test_the_authors_flags_that_would_change_a_run_unsupported_here_are_refused(folder, flags, words):
    with pytest.raises(ConfigError, match=words.replace('(', r'\(').replace(')', r'\)')):
        checked(folder, *flags)


def test_the_authors_flags_that_act_there_act_here():
    cfg = checked('cifar10', '--model-ema', '--model-ema-decay', '0.99', '--clip-grad', '1', '--clip-mode', 'agc',
                  '--no-aug', '--no-prefetcher', '--native-amp', '--lr-noise', '0.5', '0.9', '--lr-cycle-limit', '2',
                  '--dr', '0.5', '--decay-epochs', '10', '--train-split', 'train', '--val-split', 'validation',
                  '--no-resume-opt', '--eval-metric', 'top1', '--dist-bn', 'reduce')
    assert (cfg.model_ema, cfg.model_ema_decay, cfg.clip_mode, cfg.augment, cfg.prefetcher, cfg.amp) == (
        True, 0.99, 'agc', False, False, True)
    assert (cfg.lr_noise, cfg.lr_cycle_limit, cfg.decay_rate, cfg.decay_epochs, cfg.resume_opt, cfg.dist_bn) == (
        [0.5, 0.9], 2, 0.5, 10.0, False, 'reduce')
    assert checked('imagenet', '--no_pin_mem').pin_mem is False and checked('imagenet').pin_mem is True


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


# Every flag of the authors' three parsers, in their spellings (their -c/--config is the CIFAR script's).
AUTHORS_PARSERS = {
    'cifar': '''-c --config --model -T --time-step -L --layer --num-classes --img-size --input-size --dim --num-heads
        --patch-size --mlp-ratio --acratio -data-dir --dataset -d --train-split --val-split --pretrained
        --initial-checkpoint --resume --no-resume-opt --gp --crop-pct --mean --std --interpolation -b --batch-size
        -vb --val-batch-size --opt --opt-eps --opt-betas --momentum --weight-decay --clip-grad --clip-mode --sched
        --lr --lr-noise --lr-noise-pct --lr-noise-std --lr-cycle-mul --lr-cycle-limit --warmup-lr --min-lr --epochs
        --epoch-repeats --start-epoch --decay-epochs --warmup-epochs --cooldown-epochs --patience-epochs
        --decay-rate --dr --no-aug --scale --ratio --hflip --vflip --color-jitter --aa --aug-splits --jsd --reprob
        --remode --recount --resplit --mixup --cutmix --cutmix-minmax --mixup-prob --mixup-switch-prob
        --mixup-mode --mixup-off-epoch --smoothing --train-interpolation --drop --drop-connect --drop-path
        --drop-block --bn-tf --bn-momentum --bn-eps --sync-bn --dist-bn --split-bn --model-ema
        --model-ema-force-cpu --model-ema-decay --seed --log-interval --recovery-interval --checkpoint-hist -j
        --workers --save-images --amp --apex-amp --native-amp --channels-last --pin-mem --no-prefetcher --output
        --experiment --eval-metric --tta --local_rank --use-multi-epochs-loader --torchscript --log-wandb''',
    'events': '''--model --dataset --num-classes --data-path --device -b --batch-size -j --workers --print-freq
        --output-dir --resume --sync-bn --test-only --amp --world-size --dist-url --tb --T --opt --opt-eps
        --opt-betas --weight-decay --momentum --connect_f --T_train --sched --lr --lr-noise --lr-noise-pct
        --lr-noise-std --lr-cycle-mul --lr-cycle-limit --warmup-lr --min-lr --epochs --epoch-repeats
        --start-epoch --decay-epochs --warmup-epochs --cooldown-epochs --patience-epochs --decay-rate --dr
        --smoothing --mixup --cutmix --cutmix-minmax --mixup-prob --mixup-switch-prob --mixup-mode
        --mixup-off-epoch''',
    'imagenet': '''--batch_size --epochs --accum_iter --model --input_size --drop_path --clip_grad --weight_decay --lr
        --blr --layer_decay --min_lr --warmup_epochs --color_jitter --aa --smoothing --reprob --remode --recount
        --resplit --mixup --cutmix --cutmix_minmax --mixup_prob --mixup_switch_prob --mixup_mode --finetune
        --global_pool --cls_token --data_path --nb_classes --print_freq --output_dir --log_dir --device --seed
        --resume --start_epoch --eval --dist_eval --num_workers --pin_mem --no_pin_mem --world_size --local_rank
        --dist_on_itp --dist_url''',
}


@pytest.mark.parametrize('family', AUTHORS_PARSERS)
def test_every_flag_of_the_authors_parsers_is_taken_and_documented(family):
    """Their command lines parse here (no argparse error, no abbreviation), and compatibility.md says what
    each of their flags does here."""
    known = set(build_parser(None)._option_string_actions)  # the exact spellings the parser takes
    section = (REPO_ROOT / 'docs' / 'compatibility.md').read_text().split('## Every flag of their scripts')[1]
    table = section.split('\n### ')[1 + list(AUTHORS_PARSERS).index(family)].split('\n## ')[0]
    for flag in AUTHORS_PARSERS[family].split():
        assert flag in known, flag
        assert f'`{flag}`' in table, flag
