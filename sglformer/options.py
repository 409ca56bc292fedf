"""The option table: every option of the commands, with its canonical name (its YAML key and attribute),
every spelling the authors' three scripts use for it (the CIFAR scripts' timm flags ``--batch-size`` and
``-data-dir``, the DVS scripts' ``--data-path`` and ``--T``, the ImageNet script's ``--batch_size`` and
``--nb_classes``), its range and where it applies; and the flags of the authors' scripts that no option
takes, which are accepted with a warning or refused with the reason (docs/compatibility.md)."""
from dataclasses import dataclass

COMMANDS = ('train', 'eval', 'energy')
FAMILIES = ('cifar', 'imagenet', 'events')  # kinds of dataset, see sglformer.data.dataset_family
RUNS = ('train', 'eval')
IMAGES = ('cifar', 'imagenet')
PATCH_SIZES = {'cifar': 4, 'imagenet': 16, 'events': 16}  # the tokenizers' total strides
SGD_LIKE = ('sgd', 'nesterov', 'momentum', 'sgdp', 'rmsprop', 'rmsproptf', 'lars', 'lamb')
INTERPOLATIONS = ('bicubic', 'bilinear', 'nearest', 'box', 'hamming', 'lanczos')  # timm's names of PIL's filters


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
    negations: tuple = ()  # the authors' spellings that set a true-or-false option to false


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
    _train('drop_path', '--drop-path', '--drop_path', type=float, range=PROBABILITY, families=IMAGES,
           ignored='these models have no drop path'),
    _opt('per_image_neurons', '--per-image-neurons', '--per_image_neurons', type=bool, default=False,
         families=('imagenet',), help="run every neuron per image, instead of the two of the authors' ImageNet "
                                      'models that run across the images of a batch (docs/architecture.md)'),
    _opt('compare_per_image_neurons', '--compare-per-image-neurons', type=bool, default=False, commands=('eval',),
         families=('imagenet',), help='evaluate with the neurons per image as well, and report both'),
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
    _opt('interpolation', '--interpolation', default='bicubic', choices=INTERPOLATIONS, families=IMAGES,
         help='evaluation resize filter'),
    _opt('train_split', '--train-split', '--train_split', default='train', choices=('train', 'training'),
         families=('cifar',), help="the authors' timm flag: CIFAR trains on its training split"),
    _opt('val_split', '--val-split', '--val_split', default='validation', choices=('validation', 'val', 'test'),
         families=('cifar',), help="the authors' timm flag: CIFAR evaluates on its test split"),
    _train('augment', '--augment', type=bool, default=True, negations=('--no-aug',),
           help='augment the training samples (--no-aug: as evaluation transforms them)'),
    _opt('prefetcher', '--prefetcher', type=bool, default=True, families=('cifar',),
         help="timm's prefetcher: mixup on uint8 images, then normalisation and erasing of the batch on the device "
              '(--no-prefetcher: per image, mixup on the normalised batch)'),
    _train('train_interpolation', '--train-interpolation', '--train_interpolation', default='bicubic',
           choices=INTERPOLATIONS + ('random',), families=IMAGES, help='training resize filter (random: one per image)'),
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
    _opt('pin_mem', '--pin-mem', '--pin_mem', type=bool, default=False, commands=RUNS, negations=('--no_pin_mem',),
         help='page-locked batches for faster copies to the GPU'),
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
    _train('clip_mode', '--clip-mode', '--clip_mode', default='norm', choices=('norm', 'value', 'agc'),
           help="how --clip-grad clips (timm's): the gradients' norm, each value, or adaptively"),
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
    _train('decay_epochs', '--decay-epochs', '--decay_epochs', type=float, range=POSITIVE, default=30.0,
           help='sched step: epochs between decays'),
    _train('decay_rate', '--decay-rate', '--decay_rate', '--dr', type=float, range=POSITIVE, default=0.1,
           help='sched step, multistep and poly: the decay factor (poly: the power)'),
    _train('lr_noise', '--lr-noise', '--lr_noise', type=float, nargs='+', range=NONNEGATIVE,
           help="timm's learning-rate noise: from this epoch (or fraction of the epochs), or between two"),
    _train('lr_noise_pct', '--lr-noise-pct', '--lr_noise_pct', type=float, range=NONNEGATIVE, default=0.67),
    _train('lr_noise_std', '--lr-noise-std', '--lr_noise_std', type=float, range=NONNEGATIVE, default=1.0),
    _train('lr_cycle_mul', '--lr-cycle-mul', '--lr_cycle_mul', type=float, range=POSITIVE, default=1.0,
           help="timm's scheduler: each cycle this many times longer than the one before"),
    _train('lr_cycle_limit', '--lr-cycle-limit', '--lr_cycle_limit', type=int, range=COUNT, default=1,
           help="timm's scheduler: the number of cycles"),
    _train('model_ema', '--model-ema', '--model_ema', type=bool, default=False,
           help="keep an exponential moving average of the weights (timm's ModelEmaV2), evaluate it every epoch and "
                'rank the checkpoints by its accuracy'),
    _train('model_ema_decay', '--model-ema-decay', '--model_ema_decay', type=float, range=PROBABILITY,
           default=0.9998),
    _train('model_ema_force_cpu', '--model-ema-force-cpu', '--model_ema_force_cpu', type=bool, default=False,
           help='keep the average on the CPU and do not evaluate it (as timm)'),
    # run
    _train('amp', '--amp', '--native-amp', type=bool, default=False,
           help='float16 autocast with a gradient scaler (on the CPU only when given on the command line)'),
    _opt('eval_amp', '--eval-amp', '--eval_amp', type=bool, commands=RUNS,
         help='evaluate under float16 autocast (default: as amp)'),
    _opt('cudnn_benchmark', '--cudnn-benchmark', type=bool, default=False, commands=RUNS,
         help="let cuDNN time its convolution algorithms (the authors' CIFAR and ImageNet runs)"),
    _opt('cudnn_deterministic', '--cudnn-deterministic', type=bool, default=False, commands=RUNS,
         help="only deterministic cuDNN algorithms (the authors' DVS runs)"),
    _opt('dist_bn', '--dist-bn', '--dist_bn', default='', choices=('', 'broadcast', 'reduce'), commands=('train',),
         help="several processes: before each evaluation, BatchNorm statistics of process 0 (broadcast, or '') or "
              'their mean (reduce)'),
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
    _train('resume_opt', '--resume-opt', type=bool, default=True,
           help='restore the optimiser and gradient scaler with --resume (--no-resume-opt: start them afresh)'),
    _train('start_epoch', '--start-epoch', '--start_epoch', type=int, range=NONNEGATIVE, default=0,
           help='first epoch to train when not resuming'),
    _opt('initial_checkpoint', '--initial-checkpoint', '--initial_checkpoint', '--finetune', aliases=('finetune',),
         help="weights to start from (a classifier of another shape is dropped; ImageNet: the authors' --finetune)"),
    _opt('eval', '--eval', '--test-only', '--test_only', type=bool, default=False, aliases=('test_only',),
         commands=RUNS, help='only evaluate'),
    _opt('dist_eval', '--dist-eval', '--dist_eval', type=bool, default=False, commands=RUNS,
         help="the authors' flag: evaluation is always split over the processes, in whole batches"),
    _opt('reference_eval_batch_size', '--reference-eval-batch-size', '--reference_eval_batch_size', type=int,
         range=COUNT, commands=RUNS,
         help='evaluation batch size per process of the reference results; another one logs a warning'),
    _train('checkpoint_hist', '--checkpoint-hist', '--checkpoint_hist', type=int, range=COUNT,
           help='timm checkpoint layout: how many of the best numbered checkpoints to keep (default 10)'),
    _train('eval_metric', '--eval-metric', '--eval_metric', default='top1', choices=('top1',),
           help="the authors' timm flag: checkpoints are ranked by top-1"),
    _train('recompute', '--recompute', type=bool, default=True,
           help='spiking units keep less for the backward pass and recompute it (same numbers; docs/neurons.md)'),
    _opt('log_interval', '--log-interval', '--log_interval', '--print-freq', '--print_freq', type=int, range=COUNT,
         default=50, aliases=('print_freq',), commands=RUNS),
)

OPTIONS_BY_NAME = {option.name: option for option in OPTIONS}
YAML_KEYS = {alias: option.name for option in OPTIONS for alias in (option.name, *option.aliases)}


@dataclass(frozen=True)
class AuthorsFlag:
    """A flag of the authors' scripts that no option takes: accepted with a warning (``ignored``: why it
    changes nothing) on the data of ``ignored_for``, refused (``refused``: why) on the other data."""
    flags: tuple
    nargs: object = None  # 0: a switch; None: one value; '+': several
    ignored: str = ''
    refused: str = ''
    ignored_for: tuple = FAMILIES


_NEVER_READ = "the authors' script never reads it"
_TORCHRUN = "torchrun's environment says it; the authors' scripts read that too"
_AUG_SPLITS = 'augmentation splits (AugMix) need split BatchNorm layers, which the spiking units do not have'

AUTHORS_FLAGS = (
    AuthorsFlag(('--acratio',), ignored=_NEVER_READ),
    AuthorsFlag(('--pretrained',), 0, ignored=_NEVER_READ + '; there are no hosted weights'),
    AuthorsFlag(('--gp',), ignored=_NEVER_READ),
    AuthorsFlag(('--drop',), ignored=_NEVER_READ),
    AuthorsFlag(('--drop-connect',), ignored=_NEVER_READ),
    AuthorsFlag(('--drop-block',), ignored=_NEVER_READ),
    AuthorsFlag(('--bn-tf',), 0, ignored=_NEVER_READ),
    AuthorsFlag(('--bn-momentum',), ignored=_NEVER_READ),
    AuthorsFlag(('--bn-eps',), ignored=_NEVER_READ),
    AuthorsFlag(('--epoch-repeats',), ignored='only TFDS datasets repeat their epochs'),
    AuthorsFlag(('--patience-epochs',), ignored='only the plateau schedule, which is not offered, waits'),
    AuthorsFlag(('--jsd',), 0, ignored='it acts with --aug-splits only'),
    AuthorsFlag(('--tb',), 0, ignored='TensorBoard is always written'),
    AuthorsFlag(('--connect_f',), ignored="it only named the authors' run folder"),
    AuthorsFlag(('--world-size', '--world_size'), ignored=_TORCHRUN),
    AuthorsFlag(('--dist-url', '--dist_url'), ignored=_TORCHRUN),
    AuthorsFlag(('--global_pool',), 0, ignored=_NEVER_READ),
    AuthorsFlag(('--cls_token',), 0, ignored=_NEVER_READ),
    AuthorsFlag(('--resplit',), 0, ignored=_NEVER_READ, ignored_for=('imagenet',),
                refused='random erasing that spares half of each batch (timm with --resplit) is not supported'),
    AuthorsFlag(('--aug-splits',), refused=_AUG_SPLITS),
    AuthorsFlag(('--split-bn',), 0, refused=_AUG_SPLITS),
    AuthorsFlag(('--sync-bn',), 0, refused='synchronised BatchNorm would replace the BatchNorm layers that the spiking '
                                           'units recompute; each process keeps its statistics (see --dist-bn)'),
    AuthorsFlag(('--recovery-interval',), refused='every epoch ends in a checkpoint from which a run resumes exactly; '
                                                  'there are no recovery checkpoints within an epoch'),
    AuthorsFlag(('--save-images',), 0, refused='input batches are not saved as images'),
    AuthorsFlag(('--apex-amp',), 0, refused="NVIDIA Apex is not used: --amp is PyTorch's own AMP"),
    AuthorsFlag(('--channels-last',), 0, refused='the spiking units reshape [T, B, C, H, W] maps, which the '
                                                 'channels-last layout does not survive'),
    AuthorsFlag(('--tta',), refused="test-time augmentation is not supported (the authors' script averages the "
                                    'outputs of different images)'),
    AuthorsFlag(('--use-multi-epochs-loader',), 0, refused='loader workers start afresh every epoch, so that every '
                                                           'epoch draws from (seed, epoch)'),
    AuthorsFlag(('--torchscript',), 0, refused="spikingjelly's neurons cannot be scripted"),
    AuthorsFlag(('--log-wandb',), 0, refused='Weights & Biases is not a dependency; TensorBoard is written'),
    AuthorsFlag(('--dist_on_itp',), 0, refused='start several processes with torchrun'),
)
