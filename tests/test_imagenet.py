"""The ImageNet script (imagenet/train.py) end to end on a tiny synthetic ImageFolder, and the recipe's
pieces: learning rate from blr, half-cycle cosine per iteration, layer-decay groups, accumulation."""
import contextlib
import json
import logging
import math
import os
import subprocess
import sys
from argparse import Namespace

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import nn
from torch.amp import GradScaler
from torchvision.transforms import ColorJitter

from conftest import REPO_ROOT, assert_resumed_equals_straight, crash_at_epoch, free_port, train_script
from sglformer import engine, optim
from sglformer.build import load_weights
from sglformer.checkpoint import read_checkpoint
from sglformer.config import Config, check, parse_args
from sglformer.data import ShardSampler, image_transforms
from sglformer.distributed import DistInfo
from sglformer.testing import write_image_folder

CLASSES = ('n01440764', 'n01443537', 'n01484850', 'n01491361')
TRAIN_PER_CLASS, VAL_PER_CLASS = 8, 3
# A tiny sglformer_ima: 32x32 input, D=48, one local stage and one global block (with its frozen
# LayerNorms, so that DDP without find_unused_parameters is exercised), T=1.
MODEL = ['--model', 'sglformer_ima_8_384', '--dim', '48', '--num-heads', '4', '--layer', '3', '-T', '1',
         '--input_size', '32', '--nb_classes', str(len(CLASSES)), '--num_workers', '0', '--no-pin_mem',
         '--device', 'cpu', '--batch_size', '4']
SMALL = [*MODEL, '--accum_iter', '2', '--warmup_epochs', '1']  # training; evaluations take MODEL
BLR, MIN_LR = 6e-4, 1e-6  # imagenet.yml


@pytest.fixture(scope='module')
def data_path(tmp_path_factory):
    """ImageNet's layout: train/<wnid>/*.JPEG and val/<wnid>/*.JPEG, 40x48 JPEGs tinted by class."""
    return write_image_folder(tmp_path_factory.mktemp('imagenet'), CLASSES,
                              {'train': TRAIN_PER_CLASS, 'val': VAL_PER_CLASS})


def train(*flags):
    return train_script('imagenet', *flags)


def log_lines(folder):
    return [json.loads(line) for line in (folder / 'log.txt').read_text().splitlines()]


@pytest.fixture(scope='module')
def trained_run(tmp_path_factory, data_path):
    out = tmp_path_factory.mktemp('runs')
    train('--data_path', str(data_path), *SMALL, '--epochs', '2', '--output_dir', str(out / 'run'),
          '--log_dir', str(out / 'tb'))
    return out


def test_run_folder_in_the_authors_layout(trained_run):
    run = trained_run / 'run'
    names = {p.name for p in run.iterdir()}
    assert {'args.yaml', 'log.txt', 'summary.csv', 'checkpoint-last.pth', 'checkpoint-0.pth'} <= names
    assert not any(n.endswith('.tmp') for n in names)
    assert any(p.name.startswith('events.out.tfevents') for p in (trained_run / 'tb').iterdir())  # --log_dir
    lines = log_lines(run)
    assert [line['epoch'] for line in lines] == [0, 1]
    assert {'train_loss', 'train_lr', 'test_loss', 'test_acc1', 'test_acc5', 'epoch', 'n_parameters'} <= set(lines[0])
    last = read_checkpoint(run / 'checkpoint-last.pth')
    assert {'model', 'optimizer', 'epoch', 'args'} <= set(last) and last['epoch'] == 1
    assert last['args'].lr == pytest.approx(BLR * 4 * 2 / 256)  # blr x batch x accum_iter x 1 process / 256
    model = timm.create_model('sglformer_ima_8_384', embed_dims=48, num_heads=4, depths=3, T=1, num_classes=4)
    assert lines[0]['n_parameters'] == sum(p.numel() for p in model.parameters())  # the paper's count
    best = 1 if lines[1]['test_acc1'] > lines[0]['test_acc1'] else 0
    assert (run / f'checkpoint-{best}.pth').exists()


def test_eval_prints_the_line_writes_json_and_warns_about_the_batch_size(tmp_path, data_path, trained_run, capsys):
    metrics = train('--data_path', str(data_path), *MODEL, '--eval', '--resume',
                    str(trained_run / 'run' / 'checkpoint-last.pth'), '--output_dir', str(tmp_path))
    out, err = capsys.readouterr()
    assert out.strip().splitlines()[-1] == (
        f"* Acc@1 {metrics['top1']:.3f} Acc@5 {metrics['top5']:.3f} loss {metrics['loss']:.4f}")
    saved = json.loads((tmp_path / 'eval.json').read_text())
    assert saved['images'] == len(CLASSES) * VAL_PER_CLASS and saved['top1'] == metrics['top1']
    assert 'evaluating with 4 images per process' in err and 'measured with 32' in err
    last = log_lines(trained_run / 'run')[-1]
    assert metrics['top1'] == last['test_acc1'] and metrics['loss'] == pytest.approx(last['test_loss'], rel=1e-9)

    train('--data_path', str(data_path), *MODEL, '--eval', '--val-batch-size', '32', '--resume',
          str(trained_run / 'run' / 'checkpoint-last.pth'), '--output_dir', str(tmp_path))
    assert 'evaluating with' not in capsys.readouterr().err


def test_optimizer_steps_once_per_accum_iter_at_the_scheduled_lr(tmp_path, data_path, monkeypatch, capsys):
    steps = []
    real_step = torch.optim.AdamW.step

    def counting_step(self, *args, **kwargs):
        steps.append([group['lr'] for group in self.param_groups])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, 'step', counting_step)
    train('--data_path', str(data_path), *SMALL, '--epochs', '2', '--layer_decay', '0.5', '--output_dir', str(tmp_path))
    assert "'layer_decay' has no effect" in capsys.readouterr().err
    micro_batches = len(CLASSES) * TRAIN_PER_CLASS // 4
    assert len(steps) == 2 * micro_batches // 2  # 2 epochs, one step per accum_iter = 2 micro-batches

    lr = BLR * 4 * 2 / 256
    for k, group_lrs in enumerate(steps):
        epoch = (2 * k) // micro_batches + (2 * k) % micro_batches / micro_batches  # set before micro-batch 2k
        expected = lr * epoch if epoch < 1 else MIN_LR + (lr - MIN_LR) * 0.5 * (1 + math.cos(math.pi * (epoch - 1)))
        assert group_lrs == [pytest.approx(expected, rel=1e-12)] * len(group_lrs), (k, epoch)


def test_half_cosine_formula():
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param])
    schedule = optim.HalfCosine(opt, lr=1e-3, min_lr=1e-6, warmup_epochs=5, epochs=200)
    assert schedule(0.0) == 0.0
    assert schedule(2.5) == pytest.approx(5e-4) and opt.param_groups[0]['lr'] == pytest.approx(5e-4)
    assert schedule(5.0) == pytest.approx(1e-3)
    assert schedule(102.5) == pytest.approx((1e-3 + 1e-6) / 2)
    assert schedule(200.0) == pytest.approx(1e-6)
    assert optim.absolute_lr(6e-4, 32 * 2 * 8) == pytest.approx(1.2e-3)  # the paper's run: 8 processes


def authors_layer_decay(model, weight_decay, layer_decay):
    """The authors' ImageNet parameter groups, restated: a parameter's layer is 0 for names starting with
    stem or tokenizer (or cls_token, pos_embed), otherwise the last layer, len(blocks) + 1; its rate
    scale is layer_decay ** (last layer - its layer); 1-D parameters get no weight decay; frozen ones
    are left out. Returns name -> (lr scale, weight decay)."""
    last = len(model.blocks) + 1
    return {name: (layer_decay ** (last - (0 if name.startswith(('stem', 'tokenizer')) else last)),
                   0.0 if param.ndim == 1 else weight_decay)
            for name, param in model.named_parameters() if param.requires_grad}


@pytest.mark.parametrize('name', ['sglformer_ima_8_384', 'sglformer_ima2_8_384'])
def test_every_parameter_learns_as_the_authors_layer_decay_groups_have_it(name):
    model = timm.create_model(name, embed_dims=48, num_heads=4, T=1)
    cfg = parse_args(['--lr', '1e-3'], REPO_ROOT / 'imagenet' / 'imagenet.yml').replace(blr=None)
    optimizer = optim.build_optimizer(cfg, model)
    names = {id(p): n for n, p in model.named_parameters()}
    ours = {names[id(p)]: (group['lr'] / cfg.lr, group['weight_decay'])
            for group in optimizer.param_groups for p in group['params']}
    for layer_decay in (1.0, 0.75, 0.5):
        assert ours == authors_layer_decay(model, cfg.weight_decay, layer_decay)
    assert 'blocks.0.norm1.weight' not in ours  # the frozen LayerNorms are left out


class CountingSync(nn.Module):
    """A stand-in for DDP: counts the micro-batches run under ``no_sync``."""

    def __init__(self, module):
        super().__init__()
        self.module, self.unsynced = module, 0

    def forward(self, x):
        return self.module(x)

    @contextlib.contextmanager
    def no_sync(self):
        self.unsynced += 1
        yield


class Batches(list):
    def epoch(self, *args):
        return iter(self)


def test_accumulation_syncs_and_steps_only_on_the_last_micro_batch():
    model = CountingSync(nn.Linear(3, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stepped = []
    optimizer.register_step_post_hook(lambda *_: stepped.append(True))
    batches = Batches([(torch.randn(2, 3), torch.tensor([0, 1])) for _ in range(7)])
    trainer = engine.Trainer(model, model, optimizer, Namespace(num_epochs=1, lr_at=None), GradScaler('cpu', enabled=False),
                             nn.CrossEntropyLoss(), DistInfo(1, 2))
    engine.train_one_epoch(trainer, batches, 0, Config(dict(seed=0, accum_iter=3, clip_grad=None, amp=False,
                                                            log_interval=50)))
    assert len(stepped) == 3  # after micro-batches 3, 6 and the last, 7
    assert model.unsynced == 4  # micro-batches 1, 2, 4, 5 skip the gradient all-reduce


def test_resume_equals_uninterrupted(tmp_path, data_path):
    common = ['--data_path', str(data_path), *SMALL, '--epochs', '2']
    train(*common, '--output_dir', str(tmp_path / 'straight'))

    with crash_at_epoch(1):
        train(*common, '--output_dir', str(tmp_path / 'stopped'))
    train(*common, '--resume', str(tmp_path / 'stopped' / 'checkpoint-last.pth'))

    straight = read_checkpoint(tmp_path / 'straight' / 'checkpoint-last.pth')
    resumed = read_checkpoint(tmp_path / 'stopped' / 'checkpoint-last.pth')
    assert resumed['epoch'] == 1
    assert_resumed_equals_straight(resumed, straight, weights='model')
    assert [line['epoch'] for line in log_lines(tmp_path / 'stopped')] == [0, 1]


def test_start_epoch_without_resume_trains_the_remaining_epochs(tmp_path, data_path):
    train('--data_path', str(data_path), *SMALL, '--epochs', '2', '--start_epoch', '1', '--output_dir', str(tmp_path))
    assert [line['epoch'] for line in log_lines(tmp_path)] == [1]


def test_transforms_of_the_recipe():
    recipe = parse_args([], REPO_ROOT / 'imagenet' / 'imagenet.yml')
    resize, crop = image_transforms(recipe, False).transforms[:2]
    assert (resize.size, resize.interpolation.value, crop.size) == (256, 'bicubic', (224, 224))
    train_steps = image_transforms(recipe, True).transforms
    assert not any(isinstance(step, ColorJitter) for step in train_steps)  # color_jitter None, RandAugment on
    erasing = train_steps[-1]
    assert (erasing.probability, erasing.mode) == (0.25, 'pixel')
    # timm's RandAugment asks for posterize with 0 bits at magnitude 10, which current Pillow refuses.
    recipe = recipe.replace(aa='rand-m10-mstd0-inc1')
    rand_augment = next(step for step in image_transforms(recipe, True).transforms if hasattr(step, 'ops'))
    op = next(op for op in rand_augment.ops if op.name == 'PosterizeIncreasing')
    op.prob = 1.0
    image = Image.fromarray(np.full((8, 8, 3), 200, np.uint8))
    assert np.asarray(op(image)).max() == 0  # black, as with the Pillow of the authors' runs


@pytest.mark.parametrize('length, world_size, batch_size', [(11, 2, 3), (50, 8, 4), (7, 3, 32), (64, 4, 16)])
def test_evaluation_shards_hold_the_batches_of_one_process(length, world_size, batch_size):
    """Each process evaluates whole batches of the one-process run, so an image meets the same other
    images in its batch whatever the number of processes (the ImageNet models depend on them)."""
    one_process = [list(range(i, min(i + batch_size, length))) for i in range(0, length, batch_size)]
    batches = []
    for rank in range(world_size):
        shard = list(ShardSampler(length, rank, world_size, batch_size))
        batches += [shard[i:i + batch_size] for i in range(0, len(shard), batch_size)]
    assert sorted(batches) == one_process


def test_missing_folder_says_what_goes_where(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train('--data_path', str(tmp_path / 'none'), *SMALL, '--epochs', '1', '--output_dir', str(tmp_path))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert 'train/<wnid>/*.JPEG' in err and 'val/<wnid>/*.JPEG' in err and '--data_path' in err


def test_the_authors_flags_and_defaults():
    flags = {  # the authors' flag: (its value, the option it sets, the parsed value)
        '--batch_size': ('16', 'batch_size', 16), '--accum_iter': ('4', 'accum_iter', 4),
        '--blr': ('1e-3', 'blr', 1e-3),
        '--model': ('sglformer_ima2_8_384', 'model', 'sglformer_ima2_8_384'), '--input_size': ('192', 'img_size', 192),
        '--epochs': ('10', 'epochs', 10), '--warmup_epochs': ('2', 'warmup_epochs', 2),
        '--min_lr': ('1e-5', 'min_lr', 1e-5), '--weight_decay': ('0.1', 'weight_decay', 0.1),
        '--layer_decay': ('0.65', 'layer_decay', 0.65), '--aa': ('rand-m7', 'aa', 'rand-m7'),
        '--reprob': ('0.1', 'reprob', 0.1), '--remode': ('const', 'remode', 'const'), '--recount': ('2', 'recount', 2),
        '--mixup': ('0.8', 'mixup', 0.8), '--cutmix': ('1.0', 'cutmix', 1.0), '--smoothing': ('0.2', 'smoothing', 0.2),
        '--finetune': ('w.pth', 'initial_checkpoint', 'w.pth'), '--resume': ('r.pth', 'resume', 'r.pth'),
        '--data_path': ('/d', 'data_dir', '/d'), '--nb_classes': ('100', 'num_classes', 100),
        '--output_dir': ('o', 'output', 'o'), '--log_dir': ('l', 'log_dir', 'l'), '--num_workers': ('2', 'workers', 2),
        '--seed': ('3', 'seed', 3), '--print_freq': ('7', 'log_interval', 7), '--clip_grad': ('1.5', 'clip_grad', 1.5),
        '--start_epoch': ('4', 'start_epoch', 4), '--device': ('cpu', 'device', 'cpu'), '--dim': ('96', 'dim', 96),
        '--num-heads': ('2', 'num_heads', 2), '--layer': ('4', 'layer', 4), '--mlp-ratio': ('2', 'mlp_ratio', 2.0),
        '--time-step': ('2', 'time_step', 2), '--local-rank': ('0', 'local_rank', 0)}
    switches = {'--eval': 'eval', '--dist_eval': 'dist_eval', '--pin_mem': 'pin_mem'}
    argv = [item for flag, (value, _, _) in flags.items() for item in (flag, value)] + list(switches)
    args = parse_args(argv + ['--no-amp'], REPO_ROOT / 'imagenet' / 'imagenet.yml')
    for flag, (_, name, parsed) in flags.items():
        assert getattr(args, name) == parsed, flag
    assert all(getattr(args, name) is True for name in switches.values())

    recipe = parse_args([], REPO_ROOT / 'imagenet' / 'imagenet.yml').to_dict()
    expected = dict(
        batch_size=32, epochs=200, accum_iter=2, model='sglformer_ima_8_512', img_size=224, eval_amp=True,
        clip_grad=None, weight_decay=0.05, lr=None, blr=6e-4, min_lr=1e-6, warmup_epochs=5,
        color_jitter=None, aa='rand-m9-mstd0.5-inc1', smoothing=0.1, reprob=0.25, remode='pixel', recount=1,
        mixup=0.0, cutmix=0.0, mixup_prob=1.0, mixup_switch_prob=0.5, mixup_mode='batch', num_classes=1000,
        seed=0, checkpoint_format='mae', sched='halfcos', opt='adamw', amp=True, dataset='imagenet',
        mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], crop_pct=0.875, interpolation='bicubic',
        train_interpolation='bicubic', scale=[0.08, 1.0], ratio=[3 / 4, 4 / 3], hflip=0.5, cooldown_epochs=0,
        reference_eval_batch_size=32, workers=16, pin_mem=True)
    assert {key: recipe[key] for key in expected} == expected


def test_torchrun_two_processes(tmp_path, data_path):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    result = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', free_port(),
         str(REPO_ROOT / 'imagenet' / 'train.py'), '--data_path', str(data_path), *SMALL, '--epochs', '1',
         '--val_batch_size', '8', '--dist_eval', '--output_dir', str(tmp_path / 'ddp')],
        capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = log_lines(tmp_path / 'ddp')
    assert len(lines) == 1 and lines[0]['epoch'] == 0  # written once, by rank 0
    assert sum('epoch 0: train loss' in line for line in result.stderr.splitlines()) == 1
    last = read_checkpoint(tmp_path / 'ddp' / 'checkpoint-last.pth')
    assert last['args'].lr == pytest.approx(BLR * 4 * 2 * 2 / 256)  # two processes
    # What the two processes evaluated (batches of 8 and 4, with rank 0's BatchNorm statistics, summed
    # over both) is the one-process evaluation of the saved model.
    single = train('--data_path', str(data_path), *MODEL, '--eval', '--val_batch_size', '8', '--resume',
                   str(tmp_path / 'ddp' / 'checkpoint-last.pth'), '--output_dir', str(tmp_path / 'ev'))
    assert single['top1'] == lines[0]['test_acc1'] and single['loss'] == pytest.approx(lines[0]['test_loss'], rel=1e-9)


def as_the_authors_checkpoint(ours, model, cfg):
    """Our checkpoint-last.pth as the authors' script writes checkpoint-N.pth: their keys, and the AdamW state
    over their parameter groups, restated here: every parameter in the last layer, so two groups in the order
    of first appearance, with weight decay (more than one dimension) and without, the unused LayerNorms in."""
    optimizer = optim.build_optimizer(cfg, model)  # our grouping, to name our state's indices
    names = {id(p): n for n, p in model.named_parameters()}
    our_order = [names[id(p)] for group in optimizer.param_groups for p in group['params']]
    decay = [n for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [n for n, p in model.named_parameters() if p.ndim == 1]
    state = {their: ours['optimizer']['state'][our_order.index(name)]
             for their, name in enumerate(decay + no_decay) if name in our_order}
    groups = [dict(ours['optimizer']['param_groups'][1], weight_decay=cfg.weight_decay, lr_scale=1.0,
                   params=list(range(len(decay)))),
              dict(ours['optimizer']['param_groups'][0], weight_decay=0.0, lr_scale=1.0,
                   params=list(range(len(decay), len(decay) + len(no_decay))))]
    return {'model': ours['model'], 'optimizer': {'state': state, 'param_groups': groups}, 'epoch': ours['epoch'],
            'scaler': {}, 'args': Namespace(model='sglformer_ima_8_384', batch_size=4)}


def test_the_authors_training_checkpoint_resumes_exactly(tmp_path, data_path):
    common = ['--data_path', str(data_path), *SMALL, '--epochs', '2']
    train(*common, '--output_dir', str(tmp_path / 'straight'))
    with crash_at_epoch(1):
        train(*common, '--output_dir', str(tmp_path / 'stopped'))
    model = timm.create_model('sglformer_ima_8_384', embed_dims=48, num_heads=4, depths=3, T=1, num_classes=4)
    cfg = check(parse_args(common, REPO_ROOT / 'imagenet' / 'imagenet.yml'), 'train', 'imagenet').replace(lr=1e-3)
    authors = as_the_authors_checkpoint(read_checkpoint(tmp_path / 'stopped' / 'checkpoint-last.pth'), model, cfg)
    assert [len(g['params']) for g in authors['optimizer']['param_groups']] == [22, 50]  # ours: [46, 22]
    (tmp_path / 'authors').mkdir()
    torch.save(authors, tmp_path / 'authors' / 'checkpoint-0.pth')
    train(*common, '--resume', str(tmp_path / 'authors' / 'checkpoint-0.pth'), '--output_dir', str(tmp_path / 'resumed'))
    assert_resumed_equals_straight(read_checkpoint(tmp_path / 'resumed' / 'checkpoint-last.pth'),
                                   read_checkpoint(tmp_path / 'straight' / 'checkpoint-last.pth'), weights='model')


@pytest.mark.parametrize('name', ['sglformer_ima_8_384', 'sglformer_ima2_8_384'])
def test_per_image_neurons_make_each_output_independent_of_the_batch(name):
    torch.manual_seed(0)
    images = torch.rand(3, 3, 32, 32) * 3
    authors = timm.create_model(name, embed_dims=48, num_heads=4, depths=3, T=2, num_classes=4).eval()
    for module in authors.modules():  # BatchNorm that lets every layer fire
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            module.weight.data.fill_(4.0)
            module.bias.data.fill_(0.8)
    per_image = timm.create_model(name, embed_dims=48, num_heads=4, depths=3, T=2, num_classes=4,
                                  per_image_neurons=True).eval()
    per_image.load_state_dict(authors.state_dict())
    with torch.no_grad():
        for model, independent in ((per_image, True), (authors, False)):
            batch, alone = model(images), torch.cat([model(image[None]) for image in images])
            assert torch.allclose(batch, alone, rtol=0, atol=1e-5) == independent, model.per_image_neurons
        authors.set_per_image_neurons(True)
        assert torch.equal(authors(images), per_image(images))


def test_eval_compares_both_neuron_modes(tmp_path, data_path, trained_run, capsys):
    train('--data_path', str(data_path), *MODEL, '--eval', '--compare-per-image-neurons', '--resume',
          str(trained_run / 'run' / 'checkpoint-last.pth'), '--output_dir', str(tmp_path))
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2].startswith('* Acc@1 ') and lines[-2].endswith(' (neurons per image)')
    assert lines[-1].startswith('* Acc@1 ') and lines[-1].endswith(" (the authors' neurons)")
    saved = json.loads((tmp_path / 'eval.json').read_text())
    assert saved['per_image_neurons'] is False and saved['other_neurons']['images'] == saved['images']


def test_finetune_follows_the_authors_rule(tmp_path, caplog):
    """Non-strict, and the classifier's weight drawn afresh with std 2e-5 even where it was loaded."""
    source = timm.create_model('sglformer_ima_8_384', embed_dims=48, num_heads=4, depths=3, T=1, num_classes=4)
    weights = {k: v + 0.5 if v.is_floating_point() else v for k, v in source.state_dict().items()
               if k != 'localblock.0.local1.conv.bn.running_var'}
    torch.save({'model': weights, 'epoch': 199}, tmp_path / 'authors.pth')
    model = timm.create_model('sglformer_ima_8_384', embed_dims=48, num_heads=4, depths=3, T=1, num_classes=4)
    with caplog.at_level(logging.WARNING, logger='sglformer'):
        load_weights(model, tmp_path / 'authors.pth', fine_tune=True)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in weights.items() if k != 'head.weight')
    assert state['head.weight'].std() < 1e-4 and state['head.bias'].equal(weights['head.bias'])
    assert '1 weights of the model not in the file (localblock.0.local1.conv.bn.running_var)' in caplog.text


def test_an_evaluation_at_another_t_runs_with_a_warning_and_records_it(tmp_path, data_path, trained_run, capsys):
    """No weight of the ImageNet models depends on T: evaluating at another T than trained acts, and says so."""
    other_t = [flag if flag != '1' or MODEL[i - 1] != '-T' else '2' for i, flag in enumerate(MODEL)]
    train('--data_path', str(data_path), *other_t, '--eval', '--resume', str(trained_run / 'run' / 'checkpoint-last.pth'),
          '--output_dir', str(tmp_path))
    assert 'checkpoint-last.pth was trained with T=1; evaluating it with T=2' in capsys.readouterr().err
    assert json.loads((tmp_path / 'eval.json').read_text())['T'] == 2
