"""The command-line training and evaluation run behind every dataset folder's ``train.py``.

Read top to bottom: :func:`run` checks the options and resolves them once into a read-only configuration
and builds (and shape-checks) the model; :func:`train` builds the data and the optimiser, restores a
checkpoint, opens the run folder and hands over to :func:`fit`; :func:`evaluate_checkpoint` is ``--eval``.
docs/training.md describes the run folder and its guarantees.
"""
import json
import logging
import shlex
import signal
import sys

import torch
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV2, distribute_bn
from torch import nn

from . import engine
from .build import EXPECTED_ERRORS, build_model, load_weights, resolve_device
from .checkpoint import optimizer_state, resume_state
from .config import COMMAND_LINE, ConfigError, check, parse_args
from .data import build_datasets, build_eval_batches, build_train_batches, dataset_family
from .distributed import barrier, init_distributed, shutdown, stall_watch
from .files import write_file
from .logs import setup_logging
from .neuron import SPIKINGJELLY_VERSION, choose_neuron
from .optim import Schedule, absolute_lr, build_optimizer
from .options import OPTIONS_BY_NAME, RUNS
from .run_folder import RunFolder, run_folder_path

_logger = logging.getLogger(__name__)


def main(argv=None, default_config=None, description=None, defaults=None):
    """Entry point of the ``train.py`` scripts; expected problems end in one clear message (exit 2).

    ``defaults`` (for example the folder's model name) apply below the YAML file, so that a YAML file
    written for the authors' scripts, which names no model, still trains the folder's variant.
    """
    setup_logging()
    previous = signal.signal(signal.SIGTERM, _stop)  # what schedulers send: end as Ctrl-C does, lock released
    try:
        return run(parse_args(argv, default_config, description, defaults, commands=RUNS))
    except EXPECTED_ERRORS as exc:
        logging.getLogger('sglformer').error('error: %s', exc)
        sys.exit(2)
    except KeyboardInterrupt as exc:
        logging.getLogger('sglformer').error('%s', _where_stopped(exc, argv))
        sys.exit(128 + getattr(exc, 'signal', signal.SIGINT))
    finally:
        signal.signal(signal.SIGTERM, previous)
        shutdown()


class Stopped(KeyboardInterrupt):
    """A signal asked the run to end."""


def _stop(number, frame):
    stopped = Stopped()
    stopped.signal = number
    raise stopped


def _where_stopped(exc, argv):
    """One line: where the run stopped, and the command that continues it."""
    what = 'stopped by SIGTERM' if isinstance(exc, Stopped) else 'interrupted'
    epoch, last = getattr(exc, 'epoch', None), getattr(exc, 'last', None)
    where = f'{what} during epoch {epoch}' if epoch is not None else f'{what} before training began'
    if last is None or not last.exists():
        return f'{where}; no checkpoint was written: run the same command again to start afresh'
    flags = _without_weights(sys.argv[1:] if argv is None else argv)
    command = shlex.join(['python', sys.argv[0], *flags, '--resume', str(last)])
    return f'{where}; {last} holds the epochs before it. Continue with: {command}'


def _without_weights(flags):
    """``flags`` without the options that name weights to load."""
    kept, flags = [], iter(flags)
    for flag in flags:
        if flag.split('=')[0] in (*OPTIONS_BY_NAME['resume'].flags, *OPTIONS_BY_NAME['initial_checkpoint'].flags):
            if '=' not in flag:
                next(flags, None)  # its value
            continue
        kept.append(flag)
    return kept


def run(cfg):
    command = 'eval' if cfg.eval else 'train'
    check(cfg, command, dataset_family(cfg.dataset))
    dist = init_distributed(resolve_device(cfg.device).type, cfg.dist_timeout)
    setup_logging(dist.is_main)
    cfg = resolve(cfg, dist)
    torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
    torch.backends.cudnn.deterministic = cfg.cudnn_deterministic
    engine.seed_everything(cfg.seed)  # the model's initial weights
    model = build_model(cfg)
    cfg = cfg.replace(time_step=model.T)
    with stall_watch(dist, cfg.dist_timeout):
        if cfg.eval:
            return evaluate_checkpoint(cfg, model, dist)
        return train(cfg, model, dist)


def resolve(cfg, dist):
    """The configuration of this process with every derived value filled in, once: the device, the
    neurons that run on it, whether AMP applies, the learning rate from ``blr``, the evaluation batch
    size, and what makes its numbers differ in their last bits elsewhere (threads, library versions).
    This is what args.yaml and the checkpoints record.

    float16 autocast applies on CUDA as the options say; on the CPU, where it is slow, only when asked for
    on the command line (``--amp``, ``--eval-amp``)."""
    device = resolve_device(cfg.device, dist)
    cuda = device.type == 'cuda'
    amp = cfg.amp and (cuda or cfg.source('amp') == COMMAND_LINE)
    eval_amp = cfg.amp if cfg.eval_amp is None else cfg.eval_amp
    if not (cuda or cfg.source('eval_amp') == COMMAND_LINE):
        eval_amp = eval_amp and amp
    if cfg.amp and not amp:
        _logger.info('amp (%s) applies on CUDA; on the %s float16 autocast runs when --amp is on the command line',
                     cfg.source('amp') or 'default', device.type)
    choice = choose_neuron(cfg.neuron, cfg.neuron_backend, device)
    derived = dict(device=str(device), neuron=choice.implementation, neuron_backend=choice.backend, amp=amp,
                   eval_amp=eval_amp, val_batch_size=cfg.val_batch_size or cfg.batch_size, pin_mem=cfg.pin_mem and cuda,
                   threads=torch.get_num_threads(), torch_version=str(torch.__version__),
                   spikingjelly_version=SPIKINGJELLY_VERSION)
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
    ema = ModelEmaV2(model, cfg.model_ema_decay, 'cpu' if cfg.model_ema_force_cpu else None) if cfg.model_ema else None
    return engine.Trainer(model, ddp_model, optimizer, Schedule(cfg, optimizer), scaler, loss_fn, dist, ema)


def restore(trainer, checkpoint, cfg):
    """The first epoch to train, after restoring the optimiser, scaler, scheduler and weight average of the
    checkpoint being resumed (if there is one)."""
    if checkpoint is None:
        return cfg.start_epoch
    state = resume_state(checkpoint, cfg.checkpoint_format, source=cfg.resume)
    done, cooldown = state['start_epoch'], trainer.schedule.num_epochs - cfg.epochs
    if done >= trainer.schedule.num_epochs:
        raise ConfigError(f'{cfg.resume} ends epoch {state["epoch"]}: the run has trained {done} epochs, and '
                          f'--epochs {cfg.epochs}' + (f' (plus {cooldown} of cool-down)' if cooldown else '') +
                          f' leaves none to train; pass --epochs {done - cooldown + 1} or more to train further')
    if cfg.resume_opt:
        trainer.optimizer.load_state_dict(optimizer_state(trainer.optimizer, trainer.model, state['optimizer'],
                                                          cfg.resume))
        if trainer.scaler.is_enabled() and state['scaler'] is not None:
            trainer.scaler.load_state_dict(state['scaler'])
    if trainer.schedule.scheduler is not None and state['scheduler']:
        trainer.schedule.scheduler.load_state_dict(state['scheduler'])
    if trainer.ema is not None and state['ema'] is not None:
        trainer.ema.module.load_state_dict(state['ema'])
    _logger.info('resumed from %s: continuing at epoch %d', cfg.resume, done)
    return done


def train(cfg, model, dist):
    path = run_folder_path(cfg)  # in every process: a name it cannot have ends them all before the data is built
    checkpoint = load_weights(model, cfg.resume) if cfg.resume else None
    if cfg.initial_checkpoint:
        load_weights(model, cfg.initial_checkpoint, fine_tune=True)
    train_set, eval_set = build_datasets(cfg, num_classes=model.num_classes)
    device = torch.device(cfg.device)
    train_batches = build_train_batches(cfg, train_set, dist, device, model.num_classes)
    eval_batches = build_eval_batches(cfg, eval_set, dist, device, cfg.val_batch_size)
    trainer = build_trainer(cfg, model, dist, train_batches.mixes)
    start_epoch = restore(trainer, checkpoint, cfg)
    if not dist.is_main:
        return fit(cfg, trainer, train_batches, eval_batches, None, start_epoch)
    with RunFolder.open(path, cfg.checkpoint_format, cfg, num_epochs=trainer.schedule.num_epochs,
                        resume_from=cfg.resume, checkpoint=checkpoint, checkpoint_hist=cfg.checkpoint_hist,
                        log_dir=cfg.log_dir) as folder:
        _logger.info('run folder %s; %d training and %d evaluation samples; epochs %d to %d', folder.path,
                     len(train_set), len(eval_set), start_epoch, trainer.schedule.num_epochs - 1)
        return fit(cfg, trainer, train_batches, eval_batches, folder, start_epoch)


def fit(cfg, trainer, train_batches, eval_batches, folder, start_epoch):
    """Train and evaluate every epoch from ``start_epoch``; the main process (the one with the run
    ``folder``) logs and saves. Returns the best epoch's ``{'top1', 'top5', 'epoch'}`` on the main process."""
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, trainer.schedule.num_epochs):
            metrics, train_metrics = _epoch(cfg, trainer, train_batches, eval_batches, epoch, folder)
            if folder is not None:
                record_epoch(trainer, folder, epoch, train_metrics, metrics)
            barrier()
    except KeyboardInterrupt as exc:  # also while an epoch is recorded: its checkpoint may be there already
        exc.epoch, exc.last = epoch, folder and folder.last  # for the one line that main prints
        raise
    return folder.best if folder is not None else None


def _epoch(cfg, trainer, train_batches, eval_batches, epoch, folder):
    """Train one epoch and evaluate; returns the metrics that rank the epoch (those of the weights' moving
    average where one is evaluated, as timm's script does) and the training metrics."""
    device = torch.device(cfg.device)
    trainer.schedule.start_epoch(epoch)
    try:
        train_metrics = engine.train_one_epoch(trainer, train_batches, epoch, cfg)
    except engine.NonFiniteLossError as exc:
        kept = (f'the last good checkpoint is {folder.last}' if folder is not None and folder.last.exists()
                else 'no checkpoint had been written yet')
        raise engine.NonFiniteLossError(f'{exc}; training stopped, {kept}. Try a lower --lr or --no-amp') from None
    if trainer.dist.enabled:
        train_batches.loader.dataset.check_all_processes(device)
    evaluated = [trainer.model] + ([trainer.ema.module] if trainer.ema and not cfg.model_ema_force_cpu else [])
    metrics = None
    for model in evaluated:
        if trainer.dist.enabled:  # every process evaluates the model that rank 0 saves (broadcast), or the mean
            distribute_bn(model, trainer.dist.world_size, reduce=cfg.dist_bn == 'reduce')
        metrics = dict(engine.evaluate(model, eval_batches, device, cfg.eval_amp, trainer.dist.is_main),
                       model=metrics)
    return metrics, train_metrics


def record_epoch(trainer, folder, epoch, train_metrics, metrics):
    row = dict(epoch=epoch, train_loss=train_metrics['loss'], eval_loss=metrics['loss'], eval_top1=metrics['top1'],
               eval_top5=metrics['top5'], lr=train_metrics['lr'], img_per_s=train_metrics['img_per_s'])
    extra = {'grad_norm': train_metrics['grad_norm'], 'n_parameters': sum(p.numel() for p in trainer.model.parameters())}
    if metrics['model'] is not None:  # the ranked metrics are the average's; the model's own beside them
        extra.update(model_eval_top1=metrics['model']['top1'], model_eval_top5=metrics['model']['top5'])
    folder.log_epoch(row, extra)
    folder.save(epoch, metrics['top1'], metrics['top5'], model=trainer.model, optimizer=trainer.optimizer,
                scheduler=trainer.schedule.scheduler, scaler=trainer.scaler if trainer.scaler.is_enabled() else None,
                ema=trainer.ema)
    _logger.info('epoch %d: train loss %.4f, eval loss %.4f, top-1 %.2f (best %.2f), top-5 %.2f%s', epoch,
                 row['train_loss'], row['eval_loss'], row['eval_top1'], folder.best['top1'], row['eval_top5'],
                 ' (weight average)' if metrics['model'] is not None else '')


def accuracy_line(metrics):
    return f"* Acc@1 {metrics['top1']:.3f} Acc@5 {metrics['top5']:.3f} loss {metrics['loss']:.4f}"


def evaluate_checkpoint(cfg, model, dist):
    """``--eval``: the accuracy of a checkpoint's weights, printed and written to eval.json; with
    ``--compare-per-image-neurons`` also with the other neuron mode of the ImageNet models."""
    path = cfg.resume or cfg.initial_checkpoint
    folder = run_folder_path(cfg)
    trained = getattr(load_weights(model, path).get('args'), 'time_step', None)
    if trained is not None and trained != cfg.time_step:  # the ImageNet models have no weights that depend on T
        _logger.warning('%s was trained with T=%d; evaluating it with T=%d', path, trained, cfg.time_step)
    _, eval_set = build_datasets(cfg, training=False, num_classes=model.num_classes)
    batches = build_eval_batches(cfg, eval_set, dist, torch.device(cfg.device), cfg.val_batch_size)
    modes = [cfg.per_image_neurons] + ([not cfg.per_image_neurons] if cfg.compare_per_image_neurons else [])
    results = {}
    for per_image in reversed(modes):  # the run's own mode last, so that its line is the last one printed
        if model.family == 'imagenet':
            model.set_per_image_neurons(per_image)
        results[per_image] = engine.evaluate(model, batches, torch.device(cfg.device), cfg.eval_amp, dist.is_main)
        if dist.is_main:
            label = (' (neurons per image)' if per_image else " (the authors' neurons)") if len(modes) > 1 else ''
            print(accuracy_line(results[per_image]) + label, flush=True)
    metrics = results[cfg.per_image_neurons]
    if dist.is_main:
        record = dict(metrics, checkpoint=str(path), model=cfg.model, T=cfg.time_step,
                      per_image_neurons=cfg.per_image_neurons)
        if len(modes) > 1:
            record['other_neurons'] = results[not cfg.per_image_neurons]
        result = _unused_path(folder / 'eval.json')
        write_file(result, (json.dumps(record, indent=2) + '\n').encode())
        _logger.info('%d samples evaluated; results in %s', metrics['images'], result)
    return metrics


def _unused_path(path):
    """``path``, or ``name-1.json``, ``name-2.json``, ... when it exists: results are never overwritten."""
    candidate, number = path, 0
    while candidate.exists():
        number += 1
        candidate = path.with_name(f'{path.stem}-{number}{path.suffix}')
    return candidate
