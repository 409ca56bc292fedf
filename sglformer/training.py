"""The command-line training and evaluation run behind every dataset folder's ``train.py``.

Reads the options (YAML + flags), sets up torch.distributed when launched by ``torchrun``, builds the
model, data, optimiser and schedule, then trains with :mod:`sglformer.engine` and writes a run folder
(:mod:`sglformer.run_folder`). ``--resume`` continues a run exactly; ``--eval`` evaluates a checkpoint
and prints the accuracy line.
"""
import json
import logging
import random
import sys
from pathlib import Path

import numpy as np
import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn

from . import engine, optim
from .checkpoint import CheckpointError, extract_state_dict, load_state_dict, read_checkpoint
from .config import ConfigError, parse_args
from .data import DatasetError, build_datasets, build_loader
from .distributed import barrier, default_device, init_distributed, shutdown
from .logs import setup_logging
from .neuron import NeuronBackendError
from .run_folder import LAYOUTS, RunFolder, folder_name
from .variants import create_model

_logger = logging.getLogger(__name__)

EXPECTED_ERRORS = (ConfigError, DatasetError, CheckpointError, NeuronBackendError, engine.NonFiniteLossError)


def resolve_device(requested, dist):
    device = torch.device(requested or default_device())
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise ConfigError(f'--device {requested}: CUDA is not available on this machine; use --device cpu')
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


def run_folder_path(args):
    if args.experiment:
        return Path(args.output) / args.experiment
    if args.resume and not args.eval:
        return Path(args.resume).resolve().parent
    return Path(args.output) / folder_name(args, ('eval-' if args.eval and args.run_name else '') + args.run_name)


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


def build_optimizer(args, model, world_size=1):
    """``args.opt`` over timm's parameter groups, or :mod:`sglformer.optim`'s layer-decay groups when
    ``layer_decay`` is set. Without ``lr``, ``blr`` sets it (and ``args.lr``) from the images per step."""
    if args.lr is None and args.blr is not None:
        images = args.batch_size * args.accum_iter * world_size
        args.lr = optim.absolute_lr(args.blr, images)
        _logger.info('lr %.3e: blr %.3e x %d images per optimiser step (batch size %d x accum_iter %d x %d '
                     'processes) / 256', args.lr, args.blr, images, args.batch_size, args.accum_iter, world_size)
    if args.lr is None:
        raise ConfigError('no learning rate: set lr or blr in the YAML file or pass --lr or --blr')
    params = model if args.layer_decay is None else optim.layer_decay_groups(model, args.weight_decay, args.layer_decay)
    extra = {k: v for k, v in (('eps', args.opt_eps), ('betas', args.opt_betas and tuple(args.opt_betas))) if v}
    return create_optimizer_v2(params, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                               momentum=args.momentum, **extra)


class Schedule:
    """The learning rate over the run: ``start_epoch(epoch)`` before each epoch, and ``lr_at(epoch_float)``
    before each optimiser step where the schedule is per iteration (None otherwise)."""

    def __init__(self, args, optimizer):
        if args.sched == 'halfcos':
            self.scheduler, self.num_epochs = None, args.epochs
            self.lr_at = optim.HalfCosine(optimizer, args.lr, args.min_lr, args.warmup_epochs, args.epochs)
            return
        self.scheduler, self.num_epochs = create_scheduler_v2(
            optimizer, sched=args.sched, num_epochs=args.epochs, cooldown_epochs=args.cooldown_epochs,
            min_lr=args.min_lr, warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs)
        self.lr_at = None

    def start_epoch(self, epoch):
        if self.lr_at is not None:
            self.lr_at(epoch)
        else:
            self.scheduler.step(epoch)


def eval_batch_size(args, warn=True):
    """The evaluation batch size per process, with a warning when it is not ``reference_eval_batch_size``
    (set for models whose outputs depend on the other images of their batch)."""
    size = args.val_batch_size or args.batch_size
    if warn and args.reference_eval_batch_size and size != args.reference_eval_batch_size:
        _logger.warning('evaluating with %d images per process: %s gives other outputs for other batch sizes '
                        '(some of its neurons run across the images of a batch), and its reference results were '
                        'measured with %d; pass --val-batch-size %d to reproduce them', size, args.model,
                        args.reference_eval_batch_size, args.reference_eval_batch_size)
    return size


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
        _logger.info('--amp applies to CUDA only; running in float32 on %s', device.type)
        args.amp = False
    seed_everything(args.seed)
    model = create_model(args).to(device)
    args.neuron = model.neuron  # args.yaml and checkpoints record what 'auto' chose
    layout = LAYOUTS[args.checkpoint_format]
    if args.eval:
        return run_evaluation(args, model, device, dist)

    checkpoint = read_checkpoint(args.resume) if args.resume else None
    folder_path = run_folder_path(args)
    if checkpoint is None and (folder_path / layout.last).exists():
        raise ConfigError(f'{folder_path} already holds {layout.last} from an earlier run, which a new run would '
                          f'overwrite: continue it with --resume {folder_path / layout.last}, or start a new run '
                          'with --experiment NAME or another --output')
    if checkpoint is not None:
        load_state_dict(model, extract_state_dict(checkpoint, source=args.resume), source=args.resume)
    elif args.initial_checkpoint:
        load_state_dict(model, extract_state_dict(read_checkpoint(args.initial_checkpoint), source=args.initial_checkpoint),
                        drop_mismatched_head=True, source=args.initial_checkpoint)

    train_set, eval_set = build_datasets(args)
    train_loader = build_loader(train_set, args.batch_size, args.workers, args.pin_mem, dist, training=True,
                                seed=args.seed)
    eval_loader = build_loader(eval_set, eval_batch_size(args, dist.is_main), args.workers, args.pin_mem, dist,
                               training=False)
    mixup_fn = build_mixup(args, model.num_classes)
    loss_fn = train_loss(args, mixup_fn)
    optimizer = build_optimizer(args, model, dist.world_size)
    schedule = Schedule(args, optimizer)
    scaler = torch.amp.GradScaler('cuda') if args.amp else None

    start_epoch, best = args.start_epoch, None
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint['optimizer'])
        if scaler is not None and layout.scaler_key in checkpoint:
            scaler.load_state_dict(checkpoint[layout.scaler_key])
        if args.start_epoch and args.start_epoch != checkpoint['epoch'] + 1:
            _logger.warning('--start_epoch %d ignored: a resumed run continues after its checkpoint\'s epoch',
                            args.start_epoch)
        start_epoch = checkpoint['epoch'] + 1
        best = layout.best_so_far(checkpoint)
        _logger.info('resumed from %s: continuing at epoch %d', args.resume, start_epoch)

    ddp_model = model
    if dist.enabled:
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None)

    n_parameters = sum(p.numel() for p in model.parameters())  # the frozen LayerNorms too, as the authors' count
    folder = RunFolder.create(folder_path, layout, args) if dist.is_main else None
    if folder is not None:
        _logger.info('run folder %s; %d training and %d evaluation samples; %d epochs', folder.path, len(train_set),
                     len(eval_set), schedule.num_epochs)
    for epoch in range(start_epoch, schedule.num_epochs):
        seed_everything(epoch_seed(args, epoch, dist.rank))
        train_loader.sampler.set_epoch(epoch)
        train_loader.generator.manual_seed(epoch_seed(args, epoch, dist.rank))
        schedule.start_epoch(epoch)
        if mixup_fn is not None:
            mixup_fn.mixup_enabled = not (args.mixup_off_epoch and epoch >= args.mixup_off_epoch)
        try:
            train_metrics = engine.train_one_epoch(
                ddp_model, train_loader, optimizer, loss_fn, device, epoch, schedule.num_epochs, scaler=scaler,
                amp=args.amp, mixup_fn=mixup_fn, accum_iter=args.accum_iter, clip_grad=args.clip_grad,
                lr_at=schedule.lr_at, log_interval=args.log_interval, is_main=dist.is_main,
                world_size=dist.world_size)
        except engine.NonFiniteLossError as exc:
            kept = (f'the last good checkpoint is {folder.last}' if folder is not None and folder.last.exists()
                    else 'no checkpoint had been written yet')
            raise engine.NonFiniteLossError(f'{exc}; training stopped, {kept}. Try a lower --lr or --no-amp') from None
        if dist.enabled:  # every process evaluates the model that rank 0 saves, with its BatchNorm statistics
            for buffer in model.buffers():
                torch.distributed.broadcast(buffer, src=0)
        eval_metrics = engine.evaluate(model, eval_loader, device, amp=args.amp, is_main=dist.is_main)
        is_best = best is None or eval_metrics['top1'] > best['top1']
        if is_best:
            best = {'top1': eval_metrics['top1'], 'top5': eval_metrics['top5']}
        if folder is not None:
            folder.save(layout.container(model, optimizer, schedule.scheduler, scaler, epoch, args, best), epoch,
                        is_best, schedule.num_epochs)
            row = dict(epoch=epoch, train_loss=train_metrics['loss'], eval_loss=eval_metrics['loss'],
                       eval_top1=eval_metrics['top1'], eval_top5=eval_metrics['top5'], lr=train_metrics['lr'],
                       img_per_s=train_metrics['img_per_s'])
            folder.log_epoch(row, {'grad_norm': train_metrics['grad_norm'], 'n_parameters': n_parameters})
            _logger.info('epoch %d: train loss %.4f, eval loss %.4f, top-1 %.2f (best %.2f), top-5 %.2f', epoch,
                         row['train_loss'], row['eval_loss'], row['eval_top1'], best['top1'], row['eval_top5'])
        barrier()
    if folder is not None:
        folder.close()
    return best


def run_evaluation(args, model, device, dist):
    path = args.resume or args.initial_checkpoint
    if not path:
        raise ConfigError('--eval needs weights: pass --resume PATH or --initial-checkpoint PATH')
    load_state_dict(model, extract_state_dict(read_checkpoint(path), source=path), source=path)
    _, eval_set = build_datasets(args, training=False)
    loader = build_loader(eval_set, eval_batch_size(args, dist.is_main), args.workers, args.pin_mem, dist,
                          training=False)
    metrics = engine.evaluate(model, loader, device, amp=args.amp, is_main=dist.is_main)
    if dist.is_main:
        folder = run_folder_path(args)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / 'eval.json').write_text(json.dumps(dict(metrics, checkpoint=str(path), model=args.model), indent=2) + '\n')
        _logger.info('%d samples evaluated; results in %s', metrics['images'], folder / 'eval.json')
        print(accuracy_line(metrics), flush=True)
    return metrics
