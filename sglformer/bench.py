"""``python -m sglformer.bench``: the neuron implementations of one model side by side.

For each implementation named in ``--neuron`` it times the train step (forward, cross-entropy,
backward, AdamW step) and the eval forward, and measures the activation memory of the train forward.
All implementations run in one process from the same initial weights and inputs, their timed runs
interleaved so that a change in the machine's load hits all of them alike; each time is the median
of ``--repeat`` runs after ``--warmup`` untimed ones. The first implementation is the baseline of the
speed-up and memory columns; a speed-up is the median over the runs of the baseline's time divided by
the time of the run next to it. The CPU time of the train step (all threads of the process) is given
too: on a CPU shared with other work it shows the work done, where the wall-clock time also shows the
waiting; ``--threads 1`` makes it steadier still.

Activation memory is how far memory in use rises above its level before the train forward (model,
optimiser state, inputs) at its peak during the forward and loss, divided by the batch size; it is
measured after the timings. On CUDA that is ``torch.cuda.max_memory_allocated``. On the CPU it is the
growth of the process's resident set size to its peak (the kernel's high-water mark, reset through
``/proc/self/clear_refs``, after the C library's free memory is handed back). That includes what the C
library keeps of freed tensors; run with ``MALLOC_MMAP_THRESHOLD_=131072`` in the environment (glibc) to
have every tensor of 128 KiB or more mapped on its own, so that the peak is that of live tensors, as on
CUDA (timings change too).

The train step's FLOP count is that of its convolutions and matrix products, forward and backward
(``torch.utils.flop_counter``); neurons, BatchNorm and the optimiser are not counted.
"""
import argparse
import contextlib
import copy
import ctypes
import json
import logging
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from .config import ConfigError
from .energy import default_img_size, synthetic_batches
from .logs import setup_logging
from .neuron import NeuronBackendError, is_lif
from .variants import create_model

_logger = logging.getLogger('sglformer.bench')  # not __name__, which is __main__ under -m

# --neuron names: (implementation, spikingjelly backend). "spikingjelly" resolves its backend like
# the models do: CuPy on CUDA where it works, the torch loop otherwise.
NEURONS = {
    'spikingjelly': ('spikingjelly', 'auto'),
    'torch': ('spikingjelly', 'torch'),
    'cupy': ('spikingjelly', 'cupy'),
    'fused': ('fused', 'auto'),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog='python -m sglformer.bench', description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', default='sglformer_cifar10', help='registered model name')
    parser.add_argument('--batch', type=int, default=16)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--neuron', dest='neuron_list', default='spikingjelly,fused',
                        help=f"comma-separated, the first is the baseline; names: {', '.join(NEURONS)} "
                             '(torch and cupy: spikingjelly with that backend)')
    parser.add_argument('--repeat', type=int, default=5, help='timed runs of each (medians are reported)')
    parser.add_argument('--warmup', type=int, default=1, help='untimed train steps and eval passes first')
    parser.add_argument('--dim', type=int, help='embedding dimension D (default: the variant\'s)')
    parser.add_argument('--num-heads', type=int, help='attention heads (default: the variant\'s)')
    parser.add_argument('--layer', type=int, help='blocks, the models\' "depths" (default: the variant\'s)')
    parser.add_argument('-T', '--time-step', type=int, dest='time_step', help='time steps (default: the variant\'s)')
    parser.add_argument('--img-size', type=int, help='input height and width (default: the variant\'s)')
    parser.add_argument('--amp', action='store_true', help='float16 autocast with gradient scaling (CUDA only)')
    parser.add_argument('--threads', type=int, help='CPU threads for torch (default: torch\'s choice)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--json', help='also write the results to this file')
    args = parser.parse_args(argv)
    args.neurons = [name.strip() for name in args.neuron_list.split(',') if name.strip()]
    if not args.neurons or any(name not in NEURONS for name in args.neurons):
        parser.error(f"--neuron takes names from {', '.join(NEURONS)}, got {args.neuron_list!r}")
    if args.amp and torch.device(args.device).type != 'cuda':
        parser.error('--amp is float16 autocast on CUDA; run on the CPU without it')
    if args.batch < 1 or args.repeat < 1 or args.warmup < 0 or (args.threads is not None and args.threads < 1):
        parser.error('--batch, --repeat and --threads must be at least 1, --warmup at least 0')
    return args


class Runner:
    """One neuron implementation: its own copy of the model, optimiser and gradient scaler."""

    def __init__(self, name, model, amp):
        implementation, backend = NEURONS[name]
        self.name = name
        self.model = model
        model.set_neuron(implementation)
        model.set_neuron_backend(backend)
        self.amp = amp
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        self.scaler = torch.amp.GradScaler('cuda', enabled=amp)

    def autocast(self):
        return torch.autocast('cuda', dtype=torch.float16) if self.amp else contextlib.nullcontext()

    def forward_loss(self, images, labels):
        self.model.train()
        with self.autocast():
            return F.cross_entropy(self.model(images), labels)

    def backward_step(self, loss):
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def train_step(self, images, labels):
        self.backward_step(self.forward_loss(images, labels))

    def eval_forward(self, images):
        self.model.eval()
        with torch.no_grad(), self.autocast():
            self.model(images)

    def backend(self):
        """What the neurons run on: ``fused``, or the spikingjelly backend they resolved to."""
        if self.model.neuron == 'fused':
            return 'fused'
        return next(module.backend for module in self.model.modules() if is_lif(module))


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def timed(fn, device):
    """``(wall-clock seconds, CPU seconds of this process)`` of ``fn()``."""
    synchronize(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return time.perf_counter() - start, time.process_time() - start_cpu


def train_step_flops(runner, images, labels):
    with FlopCounterMode(display=False) as counter:
        runner.scaler.scale(runner.forward_loss(images, labels)).backward()
    runner.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def _status_kib(field):
    with open('/proc/self/status') as status:
        for line in status:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    raise OSError(f'no {field} in /proc/self/status')


def _release_free_memory():
    libc = ctypes.CDLL(None)
    if hasattr(libc, 'malloc_trim'):  # glibc: give the free parts of the heap back to the system
        libc.malloc_trim(0)


def peak_memory_growth(fn, device):
    """``(fn(), bytes)``: how far memory in use rose above its level before ``fn`` at its peak
    (``None`` bytes on a CPU system without ``/proc``)."""
    if device.type == 'cuda':
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - before
    _release_free_memory()
    try:
        with open('/proc/self/clear_refs', 'w') as clear_refs:
            clear_refs.write('5')  # resets the peak resident set size (VmHWM) to the current one
        before = _status_kib('VmRSS')
    except OSError as exc:
        _logger.warning('cannot measure CPU memory here (%s)', exc)
        return fn(), None
    result = fn()
    return result, (_status_kib('VmHWM') - before) * 1024


def conditions(device):
    """Where the benchmark runs, and the system's load average (other processes slow it down)."""
    info = dict(torch=torch.__version__, python=platform.python_version(), device=str(device))
    if device.type == 'cuda':
        info['gpu'] = torch.cuda.get_device_name(device)
    else:
        info['cpu'] = platform.processor() or platform.machine()
        with contextlib.suppress(OSError, StopIteration):
            with open('/proc/cpuinfo') as cpuinfo:
                info['cpu'] = next(line.split(':', 1)[1].strip() for line in cpuinfo if line.startswith('model name'))
        info['threads'] = torch.get_num_threads()
    with contextlib.suppress(OSError):
        info['load_average'] = round(os.getloadavg()[0], 2)
    return info


def run(args):
    """Benchmark ``args.neurons`` on ``args.model``; returns the report (see :func:`format_report`)."""
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    base = create_model(args).to(device)
    images = next(synthetic_batches(base, 1, args.batch, args.img_size or default_img_size(base), args.seed))
    images = images.to(device)
    labels = torch.randint(base.num_classes, (args.batch,), generator=torch.Generator().manual_seed(args.seed))
    labels = labels.to(device)
    runners = [Runner(name, copy.deepcopy(base), args.amp) for name in args.neurons]
    started = conditions(device)

    for runner in runners:
        for _ in range(args.warmup):
            runner.train_step(images, labels)
            runner.eval_forward(images)
    flops = train_step_flops(runners[0], images, labels)
    train_times = {runner.name: [] for runner in runners}
    train_cpu_times = {runner.name: [] for runner in runners}
    eval_times = {runner.name: [] for runner in runners}
    for repeat in range(args.repeat):
        for runner in runners:
            wall, cpu = timed(lambda: runner.train_step(images, labels), device)
            train_times[runner.name].append(wall)
            train_cpu_times[runner.name].append(cpu)
        for runner in runners:
            eval_times[runner.name].append(timed(lambda: runner.eval_forward(images), device)[0])
        _logger.info('run %d/%d: train step %s', repeat + 1, args.repeat,
                     ', '.join(f'{name} {times[-1]:.3f} s' for name, times in train_times.items()))
    memory = {}
    for runner in runners:
        loss, memory[runner.name] = peak_memory_growth(lambda: runner.forward_loss(images, labels), device)
        runner.backward_step(loss)
        del loss

    results = []
    for runner in runners:
        name = runner.name
        train_s, eval_s = statistics.median(train_times[name]), statistics.median(eval_times[name])
        results.append(dict(
            neuron=name, backend=runner.backend(), train_step_s=train_s, train_step_runs_s=train_times[name],
            train_step_cpu_s=statistics.median(train_cpu_times[name]), train_step_cpu_runs_s=train_cpu_times[name],
            eval_s=eval_s, eval_runs_s=eval_times[name], eval_images_per_s=args.batch / eval_s,
            train_gflop_per_s=flops / train_s / 1e9,
            activation_bytes_per_image=None if memory[name] is None else memory[name] / args.batch))
    baseline = results[0]
    for row in results:
        # Each run was timed next to the baseline's: the median of those ratios is steadier than the
        # ratio of the medians when the machine's load drifts.
        row['train_speedup'] = _paired_speedup(baseline['train_step_runs_s'], row['train_step_runs_s'])
        row['eval_speedup'] = _paired_speedup(baseline['eval_runs_s'], row['eval_runs_s'])
        memory_known = None not in (row['activation_bytes_per_image'], baseline['activation_bytes_per_image'])
        row['memory_ratio'] = (row['activation_bytes_per_image'] / baseline['activation_bytes_per_image']
                               if memory_known else None)
    model = runners[0].model
    return dict(
        model=args.model, embed_dims=model.num_features, T=model.T, input_shape=list(images.shape),
        batch=args.batch, dtype='float16 autocast' if args.amp else 'float32', repeat=args.repeat,
        warmup=args.warmup, conditions_start=started, conditions_end=conditions(device),
        train_step_flops=flops, results=results)


def _paired_speedup(baseline_runs, runs):
    return statistics.median(base / run for base, run in zip(baseline_runs, runs))


def _describe(report):
    start, end = report['conditions_start'], report['conditions_end']
    where = start.get('gpu') or f"{start['cpu']}, {start['threads']} threads"
    load = ''
    if 'load_average' in start and 'load_average' in end:
        load = f", load average {start['load_average']} -> {end['load_average']}"
    return (f"{report['model']} (D={report['embed_dims']}, T={report['T']}, input {report['input_shape']}), "
            f"{report['dtype']}, {start['device']} ({where}{load}), torch {start['torch']}; medians of "
            f"{report['repeat']} runs after {report['warmup']} warm-up; train step "
            f"{report['train_step_flops'] / 1e9:.1f} GFLOP (convolutions and matrix products, forward and backward)")


def _megabytes(value):
    return 'n/a' if value is None else f'{value / 2**20:.1f}'


def _ratio(value):
    return 'n/a' if value is None else f'{value:.2f}x'


def markdown_table(reports):
    """One table of every row of ``reports``, with a model column when there is more than one."""
    several = len(reports) > 1
    header = ['neuron', 'backend', 'train step (s)', 'speed-up', 'GFLOP/s', 'CPU time (s)', 'eval (img/s)',
              'speed-up', 'activation memory (MB/img)', 'vs baseline']
    if several:
        header = ['model', 'batch', 'dtype'] + header
    lines = ['| ' + ' | '.join(header) + ' |', '|' + ' --- |' * len(header)]
    for report in reports:
        for row in report['results']:
            cells = [row['neuron'], row['backend'], f"{row['train_step_s']:.3f}", f"{row['train_speedup']:.2f}x",
                     f"{row['train_gflop_per_s']:.1f}", f"{row['train_step_cpu_s']:.2f}",
                     f"{row['eval_images_per_s']:.1f}",
                     f"{row['eval_speedup']:.2f}x", _megabytes(row['activation_bytes_per_image']),
                     _ratio(row['memory_ratio'])]
            if several:
                cells = [report['model'], str(report['batch']), report['dtype']] + cells
            lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def format_report(reports):
    """The conditions of each report, then one table of all of them; the first row of each report is
    its baseline."""
    return '\n'.join([_describe(report) for report in reports] + ['', markdown_table(reports)])


def main(argv=None):
    setup_logging()
    args = parse_args(argv)
    try:
        report = run(args)
    except (ConfigError, NeuronBackendError) as exc:
        _logger.error('error: %s', exc)
        sys.exit(2)
    print(format_report([report]))
    if args.json:
        with open(args.json, 'w') as out:
            json.dump(report, out, indent=2)
        _logger.info('wrote %s', args.json)
    return report


if __name__ == '__main__':
    main()
