"""``python -m sglformer.bench``: neuron implementations and memory techniques of one model side by side:
exactness after one step, train-step and eval times, activation memory. docs/performance.md describes
the variants, how each number is measured, and the results."""
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

from .build import EXPECTED_ERRORS, build_model, resolve_device, synthetic_batches
from .config import Config
from .files import write_file
from .layers import ConvBNLIF, PatchEmbed, TokenMLP, TokenSelfAttention
from .logs import setup_logging
from .neuron import NEURON_BACKENDS, STACK, choose_neuron, spikingjelly_memopt

_logger = logging.getLogger('sglformer.bench')  # not __name__, which is __main__ under -m

MEMOPT_COMPRESSORS = {'checkpoint': None, 'bit': 'BitSpikeCompressor', 'sparse': 'SparseSpikeCompressor'}
MEMOPT_VARIANTS = tuple(f'memopt-{name}' for name in (*MEMOPT_COMPRESSORS, 'auto'))
SPIKING_UNITS = (ConvBNLIF, TokenSelfAttention, TokenMLP, PatchEmbed)  # what memopt checkpoints
_WRAPPED = '_checkpoint_wrapped_module.'  # memopt's wrappers put this in parameter names


def variant_names():
    """The ``--neuron`` kernels the installed spikingjelly offers (each may take ``:recompute`` or ``:plain``)."""
    names = ('spikingjelly', 'fused') + NEURON_BACKENDS[1:]
    return names + (MEMOPT_VARIANTS if spikingjelly_memopt() is not None else ())


def _variant(name):
    """``(kernel, recompute)`` of a ``--neuron`` name: the fused neurons recompute unless ``:plain``, the
    others (spikingjelly's computation, and memopt's own) only with ``:recompute``."""
    kernel, _, memory = name.partition(':')
    if memory not in ('', 'plain', 'recompute') or kernel not in variant_names() or (memory and kernel in MEMOPT_VARIANTS):
        return None
    return kernel, memory == 'recompute' or (kernel == 'fused' and memory != 'plain')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog='python -m sglformer.bench', description=__doc__.split('\n\n')[0])
    parser.add_argument('--model', default='sglformer_cifar10', help='registered model name')
    parser.add_argument('--batch', type=int, default=16)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--neuron', dest='neuron_list', default='spikingjelly,fused',
                        help=f"comma-separated variants, the first is the baseline; with {STACK}: "
                             f"{', '.join(variant_names())}, each with :recompute or :plain (docs/performance.md)")
    parser.add_argument('--repeat', type=int, default=5, help='timed runs of each (medians are reported)')
    parser.add_argument('--warmup', type=int, default=1, help='untimed train steps and eval passes first')
    parser.add_argument('--dim', type=int, help='embedding dimension D (default: the variant\'s)')
    parser.add_argument('--num-heads', type=int, help='attention heads (default: the variant\'s)')
    parser.add_argument('--layer', type=int, help='blocks, the models\' "depths" (default: the variant\'s)')
    parser.add_argument('-T', '--time-step', type=int, dest='time_step', help='time steps (default: the variant\'s)')
    parser.add_argument('--img-size', type=int, help='input height and width (default: the variant\'s)')
    parser.add_argument('--amp', action='store_true', help='float16 autocast with gradient scaling')
    parser.add_argument('--project-batch', type=int, help='also project the peak memory of training at this batch '
                                                          'size per device: activations, weights, gradients, AdamW')
    parser.add_argument('--threads', type=int, help='CPU threads for torch (default: torch\'s choice)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--json', help='also write the results to this file')
    cfg = parser.parse_args(argv)
    cfg.neurons = [name.strip() for name in cfg.neuron_list.split(',') if name.strip()]
    unknown = [name for name in cfg.neurons if _variant(name) is None]
    if not cfg.neurons or unknown:
        memopt_note = ('; the memopt-* variants need spikingjelly 2 (pip install -r requirements-sj2.txt)'
                       if any(name in MEMOPT_VARIANTS for name in unknown) else '')
        parser.error(f"--neuron takes names from {', '.join(variant_names())} with {STACK}, got "
                     f'{cfg.neuron_list!r}{memopt_note}')
    if min(cfg.batch, cfg.repeat, cfg.threads or 1, cfg.project_batch or 1) < 1 or cfg.warmup < 0:
        parser.error('--batch, --repeat, --threads and --project-batch must be at least 1, --warmup at least 0')
    return cfg


def _neuron_request(kernel):
    """``(implementation, backend)`` of a variant's neurons."""
    if kernel == 'fused':
        return 'fused', 'auto'
    return 'spikingjelly', kernel if kernel in NEURON_BACKENDS else 'auto'


class Runner:
    """One variant: its own copy of the model, optimiser and gradient scaler."""

    def __init__(self, name, model, amp, images):
        self.name = name
        self.model = model
        kernel, model.recompute = _variant(name)
        implementation, backend = _neuron_request(kernel)
        model.set_neuron(implementation)
        model.set_neuron_backend(backend)
        self.choice = choose_neuron(implementation, backend, images.device)
        if kernel in MEMOPT_VARIANTS:
            apply_memopt(model, kernel.removeprefix('memopt-'), images)
        self.device_type, self.amp = images.device.type, amp
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=amp)

    def autocast(self):
        return torch.autocast(self.device_type, dtype=torch.float16, enabled=self.amp)

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

    def first_step(self, images, labels):
        """Loss, parameter gradients and buffers of one forward and backward pass (no optimiser step)."""
        loss = self.forward_loss(images, labels)
        self.scaler.scale(loss).backward()
        grads = {name.replace(_WRAPPED, ''): p.grad.detach().clone()
                 for name, p in self.model.named_parameters() if p.grad is not None}
        buffers = {name.replace(_WRAPPED, ''): b.detach().clone() for name, b in self.model.named_buffers()}
        self.optimizer.zero_grad(set_to_none=True)
        return dict(loss=loss.detach(), grads=grads, buffers=buffers)

    def backend(self):
        """What the neurons run on: ``fused``, or the spikingjelly backend."""
        return 'fused' if self.choice.implementation == 'fused' else self.choice.backend


def apply_memopt(model, technique, images):
    """Wrap the spiking units of ``model`` as the variant ``memopt-<technique>`` says (see the module)."""
    memopt = spikingjelly_memopt()
    if technique == 'auto':
        memopt.optimize_memory(model, SPIKING_UNITS, lambda module: module(images), level=1)
        return
    compressor = MEMOPT_COMPRESSORS[technique] and getattr(memopt, MEMOPT_COMPRESSORS[technique])()
    for path, spikes in unit_inputs(model, images).items():
        unit = model.get_submodule(path)
        model.set_submodule(path, memopt.checkpoint_module(unit, compressor=compressor if spikes else None))


def unit_inputs(model, images):
    """``{path: spikes}`` of each outermost spiking unit in a train forward of a copy of ``model`` on
    ``images``: whether its first input holds only 0 and 1, which a spike compressor keeps exactly."""
    probe = copy.deepcopy(model).train()
    kinds = {}

    def record(path):
        def hook(module, args):
            kinds.setdefault(path, bool(((args[0] == 0) | (args[0] == 1)).all()))
        return hook
    handles = [module.register_forward_pre_hook(record(path))
               for path, module in probe.named_modules() if isinstance(module, SPIKING_UNITS)]
    with torch.no_grad():
        probe(images)
    for handle in handles:
        handle.remove()
    return {path: kind for path, kind in kinds.items()
            if not any(path.startswith(other + '.') for other in kinds)}


def compare(result, baseline):
    """Exactness of one variant's first step against the baseline's."""
    pairs = [(result['loss'], baseline['loss'])]
    pairs += [(result['grads'].get(name), grad) for name, grad in baseline['grads'].items()]
    pairs += [(result['buffers'].get(name), buffer) for name, buffer in baseline['buffers'].items()]
    if any(a is None or a.shape != b.shape for a, b in pairs) or result['grads'].keys() != baseline['grads'].keys():
        raise RuntimeError('the variants do not have the same parameters and buffers')
    # Under float16 autocast a first step's scaled gradients may overflow (the scaler would skip that step):
    # NaN and infinity in the same places count as equal.
    exact = all(torch.equal(a.nan_to_num(), b.nan_to_num()) and torch.equal(a.isnan(), b.isnan()) for a, b in pairs)

    def largest(tensors, relative=False):
        return max((((a.double() - b.double()).nan_to_num(0., 0., 0.).abs().max() /
                     (max(b.double().nan_to_num(0., 0., 0.).abs().max().item(), 1e-30) if relative else 1.0)).item()
                    for a, b in tensors), default=0.0)
    grads = pairs[1:1 + len(baseline['grads'])]
    return dict(exact=exact, loss_abs_diff=largest(pairs[:1]), loss_rel_diff=largest(pairs[:1], True),
                grad_abs_diff=largest(grads), grad_rel_diff=largest(grads, True),
                buffer_abs_diff=largest(pairs[1 + len(grads):]))


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
    info = dict(torch=torch.__version__, python=platform.python_version(), device=str(device), stack=STACK)
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


def _inputs(cfg, base, device):
    images = next(synthetic_batches(base, 1, cfg.batch, cfg.seed))
    labels = torch.randint(base.num_classes, (cfg.batch,), generator=torch.Generator().manual_seed(cfg.seed))
    return images.to(device), labels.to(device)


def _timings(runners, images, labels, cfg, device):
    """``{name: (train wall times, train CPU times, eval times)}``, the variants' runs interleaved."""
    times = {runner.name: ([], [], []) for runner in runners}
    for repeat in range(cfg.repeat):
        for runner in runners:
            wall, cpu = timed(lambda: runner.train_step(images, labels), device)
            times[runner.name][0].append(wall)
            times[runner.name][1].append(cpu)
        for runner in runners:
            times[runner.name][2].append(timed(lambda: runner.eval_forward(images), device)[0])
        _logger.info('run %d/%d: train step %s', repeat + 1, cfg.repeat,
                     ', '.join(f'{name} {runs[0][-1]:.3f} s' for name, runs in times.items()))
    return times


def run(cfg) -> dict:
    """Benchmark ``cfg.neurons`` on ``cfg.model``; returns the report (see :func:`format_report`)."""
    device = resolve_device(cfg.device)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    base = build_model(Config(vars(cfg)).replace(device=device))
    images, labels = _inputs(cfg, base, device)
    runners = [Runner(name, copy.deepcopy(base), cfg.amp, images) for name in cfg.neurons]
    started = conditions(device)
    first_steps = [runner.first_step(images, labels) for runner in runners]
    for runner in runners:
        for _ in range(cfg.warmup):
            runner.train_step(images, labels)
            runner.eval_forward(images)
    flops = train_step_flops(runners[0], images, labels)
    times = _timings(runners, images, labels, cfg, device)
    memory = {}
    for runner in runners:
        loss, memory[runner.name] = peak_memory_growth(lambda: runner.forward_loss(images, labels), device)
        runner.backward_step(loss)
        del loss
    results = [_result(runner, times[runner.name], memory[runner.name], flops, cfg.batch,
                       compare(first_step, first_steps[0]))
               for runner, first_step in zip(runners, first_steps)]
    for runner, row in zip(runners, results):
        if not row['exact'] and runner.backend() != runners[0].backend():
            kernels = (runner.backend(), runners[0].backend())
            row['why'] = (f'{kernels[0]} and {kernels[1]} are different kernels, whose floating-point steps differ'
                          + (' (CuPy compiles with fast math)' if 'cupy' in kernels else ''))
    _relate_to_baseline(results)
    model = runners[0].model
    if cfg.project_batch:
        _project(results, model, cfg.project_batch)
    return dict(
        model=cfg.model, embed_dims=model.num_features, T=model.T, input_shape=list(images.shape),
        batch=cfg.batch, dtype='float16 autocast' if cfg.amp else 'float32', repeat=cfg.repeat,
        warmup=cfg.warmup, conditions_start=started, conditions_end=conditions(device),
        train_step_flops=flops, project_batch=cfg.project_batch, results=results)


def _project(results, model, batch):
    """Peak memory of a training step at ``batch`` images per device: each variant's activations, plus the
    weights, their gradients and AdamW's two moments (four float32 copies of the parameters)."""
    fixed = 4 * sum(p.numel() * p.element_size() for p in model.parameters())
    for row in results:
        per_image = row['activation_bytes_per_image']
        row['projected_peak_bytes'] = None if per_image is None else per_image * batch + fixed


def _result(runner, times, memory, flops, batch, exactness):
    train_runs, train_cpu_runs, eval_runs = times
    train_s, eval_s = statistics.median(train_runs), statistics.median(eval_runs)
    return dict(
        neuron=runner.name, backend=runner.backend(), train_step_s=train_s, train_step_runs_s=train_runs,
        train_step_cpu_s=statistics.median(train_cpu_runs), train_step_cpu_runs_s=train_cpu_runs,
        eval_s=eval_s, eval_runs_s=eval_runs, eval_images_per_s=batch / eval_s,
        train_gflop_per_s=flops / train_s / 1e9,
        activation_bytes_per_image=None if memory is None else memory / batch, **exactness)


def _relate_to_baseline(results):
    baseline = results[0]
    for row in results:
        # Each run was timed next to the baseline's: the median of those ratios is steadier than the
        # ratio of the medians when the machine's load drifts.
        row['train_speedup'] = _paired_speedup(baseline['train_step_runs_s'], row['train_step_runs_s'])
        row['eval_speedup'] = _paired_speedup(baseline['eval_runs_s'], row['eval_runs_s'])
        memory_known = None not in (row['activation_bytes_per_image'], baseline['activation_bytes_per_image'])
        row['memory_ratio'] = (row['activation_bytes_per_image'] / baseline['activation_bytes_per_image']
                               if memory_known else None)


def _paired_speedup(baseline_runs, runs):
    return statistics.median(base / run for base, run in zip(baseline_runs, runs))


def _describe(report):
    start, end = report['conditions_start'], report['conditions_end']
    where = start.get('gpu') or f"{start['cpu']}, {start['threads']} threads"
    load = ''
    if 'load_average' in start and 'load_average' in end:
        load = f", load average {start['load_average']} -> {end['load_average']}"
    return (f"{report['model']} (D={report['embed_dims']}, T={report['T']}, input {report['input_shape']}), "
            f"{report['dtype']}, {start['device']} ({where}{load}), torch {start['torch']}, "
            f"{start.get('stack', 'spikingjelly')}; medians of {report['repeat']} runs after {report['warmup']} "
            f"warm-up; train step {report['train_step_flops'] / 1e9:.1f} GFLOP (convolutions and matrix products, "
            'forward and backward)')


def _megabytes(value):
    return 'n/a' if value is None else f'{value / 2**20:.1f}'


def _ratio(value):
    return 'n/a' if value is None else f'{value:.2f}x'


def _exactness(row):
    if row['exact']:
        return 'exact'
    return (f"loss {row['loss_abs_diff']:.1e} ({row['loss_rel_diff']:.1e} rel), "
            f"grads {row['grad_abs_diff']:.1e} ({row['grad_rel_diff']:.1e} rel)" + (f": {row['why']}" if 'why' in row else ''))


def markdown_table(reports):
    """One table of every row of ``reports``, with model and stack columns when there is more than one."""
    several = len(reports) > 1
    header = ['variant', 'neurons', 'train step (s)', 'speed-up', 'GFLOP/s', 'CPU time (s)', 'eval (img/s)',
              'speed-up', 'activation memory (MB/img)', 'vs baseline', 'vs baseline after one step']
    projected = next((report['project_batch'] for report in reports if report.get('project_batch')), None)
    if projected:
        header.append(f'peak at batch {projected} (GB)')
    if several:
        header = ['model', 'stack', 'batch', 'dtype'] + header
    lines = ['| ' + ' | '.join(header) + ' |', '|' + ' --- |' * len(header)]
    for report in reports:
        for row in report['results']:
            cells = [row['neuron'], row['backend'], f"{row['train_step_s']:.3f}", f"{row['train_speedup']:.2f}x",
                     f"{row['train_gflop_per_s']:.1f}", f"{row['train_step_cpu_s']:.2f}",
                     f"{row['eval_images_per_s']:.1f}", f"{row['eval_speedup']:.2f}x",
                     _megabytes(row['activation_bytes_per_image']), _ratio(row['memory_ratio']), _exactness(row)]
            if projected:
                peak = row.get('projected_peak_bytes')
                cells.append('n/a' if peak is None else f'{peak / 1e9:.1f}')
            if several:
                stack = report['conditions_start'].get('stack', 'spikingjelly')
                cells = [report['model'], stack, str(report['batch']), report['dtype']] + cells
            lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def format_report(reports):
    """The conditions of each report, then one table of all of them; the first row of each report is
    its baseline."""
    return '\n'.join([_describe(report) for report in reports] + ['', markdown_table(reports)])


def main(argv: list = None) -> dict:
    setup_logging()
    cfg = parse_args(argv)
    try:
        report = run(cfg)
        print(format_report([report]))
        if cfg.json:
            write_file(cfg.json, json.dumps(report, indent=2).encode())
            _logger.info('wrote %s', cfg.json)
    except EXPECTED_ERRORS as exc:
        _logger.error('error: %s', exc)
        sys.exit(2)
    return report


if __name__ == '__main__':
    main()
