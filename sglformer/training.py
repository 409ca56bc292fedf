"""The command-line training and evaluation run behind every dataset folder's ``train.py``.

Reads the options (YAML + flags), sets up torch.distributed when launched by ``torchrun``, builds the
model, data, optimiser and schedule, then trains with :mod:`sglformer.engine`, writing a run folder:
``args.yaml``, ``summary.csv``, TensorBoard events and checkpoints (atomically). ``--resume``
continues a run exactly; ``--eval`` evaluates a checkpoint and prints the accuracy line.
"""
import csv
import datetime
import json
import logging
import os
import random
import shutil
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import timm
import torch
import yaml
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn

from . import engine
from .checkpoint import CheckpointError, extract_state_dict, load_state_dict, read_checkpoint, save_checkpoint
from .config import ConfigError, parse_args
from .data import DatasetError, build_datasets, build_loader
from .distributed import barrier, init_distributed, shutdown
from .logs import setup_logging
from .neuron import NeuronBackendError
from .variants import load_variants

_logger = logging.getLogger(__name__)

# Options that map onto model constructor keywords (the authors' names); None leaves the variant's default.
MODEL_KWARGS = {'time_step': 'T', 'layer': 'depths', 'dim': 'embed_dims', 'num_heads': 'num_heads',
                'mlp_ratio': 'mlp_ratios', 'num_classes': 'num_classes', 'patch_size': 'patch_size',
                'neuron_backend': 'neuron_backend'}
SUMMARY_FIELDS = ('epoch', 'train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'lr', 'img_per_s')
EXPECTED_ERRORS = (ConfigError, DatasetError, CheckpointError, NeuronBackendError, engine.NonFiniteLossError)


class CheckpointFiles:
    """File names and container of timm's CheckpointSaver: ``last.pth.tar`` after every epoch,
    ``model_best.pth.tar``, the last N ``checkpoint-{epoch}.pth.tar``; keys ``epoch, arch, state_dict,
    optimizer, version, args, metric, amp_scaler``."""

    last = 'last.pth.tar'
    best = 'model_best.pth.tar'
    numbered = 'checkpoint-{epoch}.pth.tar'

    def __init__(self, folder, keep):
        self.folder = Path(folder)
        self.keep = keep

    @staticmethod
    def container(model, optimizer, scaler, epoch, args, metric):
        state = {'epoch': epoch, 'arch': args.model, 'state_dict': model.state_dict(),
                 'optimizer': optimizer.state_dict(), 'version': 2, 'args': Namespace(**vars(args)), 'metric': metric}
        if scaler is not None:
            state['amp_scaler'] = scaler.state_dict()
        return state

    def save(self, state, epoch, is_best):
        last = self.folder / self.last
        save_checkpoint(state, last)
        _link_atomically(last, self.folder / self.numbered.format(epoch=epoch))
        if is_best:
            _link_atomically(last, self.folder / self.best)
        for old in range(epoch - self.keep, -1, -1):
            stale = self.folder / self.numbered.format(epoch=old)
            if not stale.exists():
                break
            stale.unlink()


def _link_atomically(source, target):
    """``target`` becomes a copy of ``source`` (a hard link where possible) without a moment in which
    it is missing or half written."""
    tmp = target.with_name(f'.{target.name}.tmp')
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:  # file systems without hard links
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def default_device():
    return 'cuda' if torch.cuda.is_available() else 'cpu'


def resolve_device(requested, dist):
    name = requested or default_device()
    device = torch.device(name)
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        if dist.enabled:
            device = torch.device('cuda', dist.local_rank)
    return device


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def epoch_seed(args, epoch, rank):
    """Every random draw of an epoch follows from (seed, epoch, rank), so a resumed run repeats the
    augmentation, mixup and shuffling of an uninterrupted one without saving RNG states."""
    return args.seed * 1_000_003 + epoch * 1009 + rank


def create_model_from_args(args):
    kwargs = {kw: getattr(args, opt) for opt, kw in MODEL_KWARGS.items() if getattr(args, opt) is not None}
    if args.img_size is not None:
        kwargs.update(img_size_h=args.img_size, img_size_w=args.img_size)
    try:
        return timm.create_model(args.model, **kwargs)
    except RuntimeError as exc:
        if 'Unknown model' in str(exc):
            names = ', '.join(load_variants())
            raise ConfigError(f'unknown model {args.model!r}; registered: {names}') from None
        raise


def run_folder(args, resume_path):
    if args.experiment:
        return Path(args.output) / args.experiment
    if resume_path:
        return Path(resume_path).resolve().parent
    stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
    kind = 'eval' if args.eval else 'train'
    return Path(args.output) / f'{stamp}-{kind}-{args.model}'


def build_mixup(args, num_classes):
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None:
        return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                     prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                     label_smoothing=args.smoothing, num_classes=num_classes)
    return None


def train_loss(args, mixup_fn):
    if mixup_fn is not None:
        return SoftTargetCrossEntropy()  # mixup's targets already carry the label smoothing
    if args.smoothing:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return nn.CrossEntropyLoss()


def accuracy_line(metrics):
    return f"* Acc@1 {metrics['top1']:.3f} Acc@5 {metrics['top5']:.3f} loss {metrics['loss']:.4f}"


def main(argv=None, default_config=None, description=None, defaults=None):
    """Entry point of the ``train.py`` scripts; expected problems end in one clear message (exit 2).

    ``defaults`` (for example the folder's model name) apply below the YAML file, so that a YAML file
    written for the authors' scripts, which names no model, still trains the folder's variant.
    """
    setup_logging()
    try:
        return run(parse_args(argv, default_config, description, defaults))
    except EXPECTED_ERRORS as exc:
        logging.getLogger('sglformer').error('error: %s', exc)
        sys.exit(2)
    finally:
        shutdown()


def run(args):
    dist = init_distributed(torch.device(args.device or default_device()).type)
    setup_logging(dist.is_main)
    device = resolve_device(args.device, dist)
    if args.amp and device.type != 'cuda':
        _logger.info('--amp applies to CUDA only; training in float32 on %s', device.type)
        args.amp = False
    load_variants()
    seed_everything(args.seed)
    model = create_model_from_args(args).to(device)
    resume_path = args.resume or None
    folder = run_folder(args, resume_path)
    if args.eval:
        return run_evaluation(args, model, device, dist, folder)

    checkpoint = None
    if resume_path:
        checkpoint = read_checkpoint(resume_path)
        load_state_dict(model, extract_state_dict(checkpoint, source=resume_path), source=resume_path)
    elif args.initial_checkpoint:
        load_state_dict(model, extract_state_dict(read_checkpoint(args.initial_checkpoint), source=args.initial_checkpoint),
                        drop_mismatched_head=True, source=args.initial_checkpoint)

    train_set, eval_set = build_datasets(args)
    train_loader = build_loader(train_set, args.batch_size, args.workers, args.pin_mem, dist, training=True, seed=args.seed)
    eval_loader = build_loader(eval_set, args.val_batch_size or args.batch_size, args.workers, args.pin_mem, dist,
                               training=False)
    num_classes = model.num_classes
    mixup_fn = build_mixup(args, num_classes)
    loss_fn = train_loss(args, mixup_fn)

    if args.lr is None:
        raise ConfigError('no learning rate: set lr in the YAML file or pass --lr')
    extra = {k: v for k, v in (('eps', args.opt_eps), ('betas', args.opt_betas and tuple(args.opt_betas))) if v}
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                    momentum=args.momentum, **extra)
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, cooldown_epochs=args.cooldown_epochs,
        min_lr=args.min_lr, warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs)
    scaler = torch.amp.GradScaler('cuda') if args.amp else None

    start_epoch, best = 0, None
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint['optimizer'])
        if scaler is not None and 'amp_scaler' in checkpoint:
            scaler.load_state_dict(checkpoint['amp_scaler'])
        start_epoch = checkpoint['epoch'] + 1
        best = checkpoint.get('metric')
        _logger.info('resumed from %s: continuing at epoch %d', resume_path, start_epoch)

    ddp_model = model
    if dist.enabled:
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None)

    files = CheckpointFiles(folder, args.checkpoint_hist)
    writer = None
    if dist.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / 'args.yaml').write_text(yaml.safe_dump(vars(args), sort_keys=True))
        from torch.utils.tensorboard import SummaryWriter  # slow to import; only the main process writes
        writer = SummaryWriter(log_dir=str(folder))
        _logger.info('run folder %s; %d training and %d evaluation images; %d epochs', folder, len(train_set),
                     len(eval_set), num_epochs)

    for epoch in range(start_epoch, num_epochs):
        seed_everything(epoch_seed(args, epoch, dist.rank))
        train_loader.sampler.set_epoch(epoch)
        train_loader.generator.manual_seed(epoch_seed(args, epoch, dist.rank))
        scheduler.step(epoch)
        if mixup_fn is not None:
            mixup_fn.mixup_enabled = not (args.mixup_off_epoch and epoch >= args.mixup_off_epoch)
        try:
            train_metrics = engine.train_one_epoch(
                ddp_model, train_loader, optimizer, loss_fn, device, epoch, num_epochs, scaler=scaler, amp=args.amp,
                mixup_fn=mixup_fn, accum_iter=args.accum_iter, clip_grad=args.clip_grad,
                log_interval=args.log_interval, is_main=dist.is_main, world_size=dist.world_size)
        except engine.NonFiniteLossError as exc:
            last = folder / files.last
            kept = f'the last good checkpoint is {last}' if last.exists() else 'no checkpoint had been written yet'
            raise engine.NonFiniteLossError(f'{exc}; training stopped, {kept}. Try a lower --lr or --no-amp') from None
        eval_metrics = engine.evaluate(ddp_model, eval_loader, device, amp=args.amp, is_main=dist.is_main)
        is_best = best is None or eval_metrics['top1'] > best
        best = eval_metrics['top1'] if is_best else best
        if dist.is_main:
            files.save(CheckpointFiles.container(model, optimizer, scaler, epoch, args, eval_metrics['top1']), epoch, is_best)
            row = dict(epoch=epoch, train_loss=train_metrics['loss'], eval_loss=eval_metrics['loss'],
                       eval_top1=eval_metrics['top1'], eval_top5=eval_metrics['top5'], lr=train_metrics['lr'],
                       img_per_s=train_metrics['img_per_s'])
            _append_summary(folder / 'summary.csv', row)
            for key, value in row.items():
                if key != 'epoch':
                    writer.add_scalar(key, value, epoch)
            writer.flush()
            _logger.info('epoch %d: train loss %.4f, eval loss %.4f, top-1 %.2f (best %.2f), top-5 %.2f', epoch,
                         row['train_loss'], row['eval_loss'], row['eval_top1'], best, row['eval_top5'])
        barrier()
    if writer is not None:
        writer.close()
    return best


def _append_summary(path, row):
    new = not path.exists()
    with open(path, 'a', newline='') as f:
        out = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS)
        if new:
            out.writeheader()
        out.writerow({k: (f'{v:.6g}' if isinstance(v, float) else v) for k, v in row.items()})


def run_evaluation(args, model, device, dist, folder):
    path = args.resume or args.initial_checkpoint
    if not path:
        raise ConfigError('--eval needs weights: pass --resume PATH or --initial-checkpoint PATH')
    load_state_dict(model, extract_state_dict(read_checkpoint(path), source=path), source=path)
    _, eval_set = build_datasets(args, training=False)
    loader = build_loader(eval_set, args.val_batch_size or args.batch_size, args.workers, args.pin_mem, dist,
                          training=False)
    metrics = engine.evaluate(model, loader, device, amp=args.amp, is_main=dist.is_main)
    if dist.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        result = dict(metrics, checkpoint=str(path), model=args.model)
        (folder / 'eval.json').write_text(json.dumps(result, indent=2) + '\n')
        _logger.info('%d images evaluated; results in %s', metrics['images'], folder / 'eval.json')
        print(accuracy_line(metrics), flush=True)
    return metrics
