"""The command-line training and evaluation run behind every dataset folder's ``train.py``.

Read top to bottom: :func:`run` checks the options and resolves them once into a read-only configuration
and builds (and shape-checks) the model; :func:`train` builds the data and the optimiser, restores a
checkpoint, opens the run folder and hands over to :func:`fit`; :func:`evaluate_checkpoint` is ``--eval``.
docs/training.md describes the run folder and its guarantees.
"""
import json
import logging
import sys

import torch
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

from . import engine
from .build import EXPECTED_ERRORS, build_model, load_weights, resolve_device
from .checkpoint import read_checkpoint, resume_state
from .config import RUNS, check, parse_args
from .data import build_datasets, build_eval_batches, build_train_batches, dataset_family
from .distributed import barrier, default_device, init_distributed, shutdown, stall_watch
from .files import write_atomically
from .logs import setup_logging
from .neuron import choose_neuron
from .optim import Schedule, absolute_lr, build_optimizer
from .run_folder import RunFolder, run_folder_path

_logger = logging.getLogger(__name__)


def main(argv=None, default_config=None, description=None, defaults=None):
    """Entry point of the ``train.py`` scripts; expected problems end in one clear message (exit 2).

    ``defaults`` (for example the folder's model name) apply below the YAML file, so that a YAML file
    written for the authors' scripts, which names no model, still trains the folder's variant.
    """
    setup_logging()
    try:
        return run(parse_args(argv, default_config, description, defaults, commands=RUNS))
    except EXPECTED_ERRORS as exc:
        logging.getLogger('sglformer').error('error: %s', exc)
        sys.exit(2)
    finally:
        shutdown()


def run(cfg):
    command = 'eval' if cfg.eval else 'train'
    check(cfg, command, dataset_family(cfg.dataset))
    dist = init_distributed(torch.device(cfg.device or default_device()).type, cfg.dist_timeout)
    setup_logging(dist.is_main)
    cfg = resolve(cfg, dist)
    engine.seed_everything(cfg.seed)  # the model's initial weights
    model = build_model(cfg)
    with stall_watch(dist, cfg.dist_timeout):
        if cfg.eval:
            return evaluate_checkpoint(cfg, model, dist)
        return train(cfg, model, dist)


def resolve(cfg, dist):
    """The configuration of this process with every derived value filled in, once: the device, the
    neurons that run on it, whether AMP applies, the learning rate from ``blr``, the evaluation batch
    size. This is what args.yaml and the checkpoints record."""
    device = resolve_device(cfg.device, dist)
    if cfg.amp and device.type != 'cuda':
        _logger.info('--amp applies to CUDA only; running in float32 on %s', device.type)
    choice = choose_neuron(cfg.neuron, cfg.neuron_backend, device)
    eval_amp = cfg.amp if cfg.eval_amp is None else cfg.eval_amp
    derived = dict(device=str(device), neuron=choice.implementation, neuron_backend=choice.backend,
                   amp=cfg.amp and device.type == 'cuda', eval_amp=eval_amp and device.type == 'cuda',
                   val_batch_size=cfg.val_batch_size or cfg.batch_size)
    if not cfg.eval and cfg.lr is None:
        images = cfg.batch_size * cfg.accum_iter * dist.world_size
        derived['lr'] = absolute_lr(cfg.blr, images)
        _logger.info('lr %.3e: blr %.3e x %d images per optimiser step (batch size %d x accum_iter %d x %d '
                     'processes) / 256', derived['lr'], cfg.blr, images, cfg.batch_size, cfg.accum_iter,
                     dist.world_size)
    cfg = cfg.replace(**derived)
    if dist.is_main:
        _warn_about_batch_dependence(cfg)
    return cfg


def _warn_about_batch_dependence(cfg):
    if cfg.reference_eval_batch_size and cfg.val_batch_size != cfg.reference_eval_batch_size:
        _logger.warning('evaluating with %d images per process: %s gives other outputs for other batch sizes (some '
                        'of its neurons run across the images of a batch), and its reference results were measured '
                        'with %d; pass --val-batch-size %d to reproduce them', cfg.val_batch_size, cfg.model,
                        cfg.reference_eval_batch_size, cfg.reference_eval_batch_size)


def build_trainer(cfg, model, dist, mixes):
    ddp_model = model
    if dist.enabled:
        device = torch.device(cfg.device)
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None)
    optimizer = build_optimizer(cfg, model)
    if mixes:
        loss_fn = SoftTargetCrossEntropy()  # mixup's targets already carry the label smoothing
    else:
        loss_fn = LabelSmoothingCrossEntropy(smoothing=cfg.smoothing) if cfg.smoothing else nn.CrossEntropyLoss()
    scaler = torch.amp.GradScaler(torch.device(cfg.device).type, enabled=cfg.amp)
    return engine.Trainer(model, ddp_model, optimizer, Schedule(cfg, optimizer), scaler, loss_fn, dist)


def restore(trainer, checkpoint, cfg):
    """The first epoch to train, after restoring the optimiser, scaler and scheduler of the checkpoint
    being resumed (if there is one)."""
    if checkpoint is None:
        return cfg.start_epoch
    state = resume_state(checkpoint, cfg.checkpoint_format, source=cfg.resume)
    trainer.optimizer.load_state_dict(state['optimizer'])
    if trainer.scaler.is_enabled() and state['scaler'] is not None:
        trainer.scaler.load_state_dict(state['scaler'])
    if trainer.schedule.scheduler is not None and state['scheduler']:
        trainer.schedule.scheduler.load_state_dict(state['scheduler'])
    _logger.info('resumed from %s: continuing at epoch %d', cfg.resume, state['start_epoch'])
    return state['start_epoch']


def train(cfg, model, dist):
    checkpoint = load_weights(model, cfg.resume) if cfg.resume else None
    if cfg.initial_checkpoint:
        load_weights(model, cfg.initial_checkpoint, fine_tune=True)
    train_set, eval_set = build_datasets(cfg)
    device = torch.device(cfg.device)
    train_batches = build_train_batches(cfg, train_set, dist, device, model.num_classes)
    eval_batches = build_eval_batches(cfg, eval_set, dist, device, cfg.val_batch_size)
    trainer = build_trainer(cfg, model, dist, train_batches.mixes)
    start_epoch = restore(trainer, checkpoint, cfg)
    if not dist.is_main:
        return fit(cfg, trainer, train_batches, eval_batches, None, start_epoch)
    with RunFolder.open(run_folder_path(cfg), cfg.checkpoint_format, cfg, num_epochs=trainer.schedule.num_epochs,
                        resume_from=cfg.resume, checkpoint=checkpoint, checkpoint_hist=cfg.checkpoint_hist,
                        log_dir=cfg.log_dir) as folder:
        _logger.info('run folder %s; %d training and %d evaluation samples; epochs %d to %d', folder.path,
                     len(train_set), len(eval_set), start_epoch, trainer.schedule.num_epochs - 1)
        return fit(cfg, trainer, train_batches, eval_batches, folder, start_epoch)


def fit(cfg, trainer, train_batches, eval_batches, folder, start_epoch):
    """Train and evaluate every epoch from ``start_epoch``; the main process (the one with the run
    ``folder``) logs and saves. Returns the best epoch's ``{'top1', 'top5', 'epoch'}`` on the main process."""
    device = torch.device(cfg.device)
    for epoch in range(start_epoch, trainer.schedule.num_epochs):
        trainer.schedule.start_epoch(epoch)
        try:
            train_metrics = engine.train_one_epoch(trainer, train_batches, epoch, cfg)
        except engine.NonFiniteLossError as exc:
            kept = (f'the last good checkpoint is {folder.last}' if folder is not None and folder.last.exists()
                    else 'no checkpoint had been written yet')
            raise engine.NonFiniteLossError(f'{exc}; training stopped, {kept}. Try a lower --lr or --no-amp') from None
        if trainer.dist.enabled:  # every process evaluates the model that rank 0 saves, with its BatchNorm statistics
            for buffer in trainer.model.buffers():
                torch.distributed.broadcast(buffer, src=0)
        metrics = engine.evaluate(trainer.model, eval_batches, device, cfg.eval_amp, trainer.dist.is_main)
        if folder is not None:
            record_epoch(trainer, folder, epoch, train_metrics, metrics)
        barrier()
    return folder.best if folder is not None else None


def record_epoch(trainer, folder, epoch, train_metrics, metrics):
    row = dict(epoch=epoch, train_loss=train_metrics['loss'], eval_loss=metrics['loss'], eval_top1=metrics['top1'],
               eval_top5=metrics['top5'], lr=train_metrics['lr'], img_per_s=train_metrics['img_per_s'])
    folder.log_epoch(row, {'grad_norm': train_metrics['grad_norm'],
                           'n_parameters': sum(p.numel() for p in trainer.model.parameters())})
    folder.save(epoch, metrics['top1'], metrics['top5'], model=trainer.model, optimizer=trainer.optimizer,
                scheduler=trainer.schedule.scheduler, scaler=trainer.scaler if trainer.scaler.is_enabled() else None)
    _logger.info('epoch %d: train loss %.4f, eval loss %.4f, top-1 %.2f (best %.2f), top-5 %.2f', epoch,
                 row['train_loss'], row['eval_loss'], row['eval_top1'], folder.best['top1'], row['eval_top5'])


def accuracy_line(metrics):
    return f"* Acc@1 {metrics['top1']:.3f} Acc@5 {metrics['top5']:.3f} loss {metrics['loss']:.4f}"


def evaluate_checkpoint(cfg, model, dist):
    path = cfg.resume or cfg.initial_checkpoint
    load_weights(model, path)
    _, eval_set = build_datasets(cfg, training=False)
    batches = build_eval_batches(cfg, eval_set, dist, torch.device(cfg.device), cfg.val_batch_size)
    metrics = engine.evaluate(model, batches, torch.device(cfg.device), cfg.eval_amp, dist.is_main)
    if dist.is_main:
        result = _unused_path(run_folder_path(cfg) / 'eval.json')
        text = json.dumps(dict(metrics, checkpoint=str(path), model=cfg.model), indent=2) + '\n'
        write_atomically(result, lambda f: f.write(text.encode()))
        _logger.info('%d samples evaluated; results in %s', metrics['images'], result)
        print(accuracy_line(metrics), flush=True)
    return metrics


def _unused_path(path):
    """``path``, or ``name-1.json``, ``name-2.json``, ... when it exists: results are never overwritten."""
    candidate, number = path, 0
    while candidate.exists():
        number += 1
        candidate = path.with_name(f'{path.stem}-{number}{path.suffix}')
    return candidate
