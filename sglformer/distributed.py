"""torch.distributed set-up for runs under ``torchrun`` (env:// rendezvous), and one-process runs."""
import contextlib
import datetime
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

# What torch's collectives report when a peer stopped answering or went away.
_STALL_MESSAGES = ('timed out', 'timeout', 'connection closed by peer', 'connection reset by peer')


class DistributedError(RuntimeError):
    """A process of a distributed run stopped answering within the timeout."""


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0


_health_group = None  # a second gloo group: after a collective failed, it finds out who stopped answering
PROBE_SECONDS = 5


def default_device():
    return 'cuda' if torch.cuda.is_available() else 'cpu'


def init_distributed(device_type, timeout_minutes=30.0):
    """Join the process group that ``torchrun`` describes in the environment (nccl on CUDA, gloo
    on CPU); a plain ``python train.py`` is a group of one and needs no set-up. A collective that
    waits longer than ``timeout_minutes`` for another process fails (see :func:`stall_watch`)."""
    global _health_group
    world_size = int(os.environ.get('WORLD_SIZE', 1))
    if world_size <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ['RANK']), world_size, int(os.environ.get('LOCAL_RANK', 0)))
    if not dist.is_initialized():
        if device_type == 'cuda':
            torch.cuda.set_device(info.local_rank)
        timeout = datetime.timedelta(minutes=timeout_minutes)
        dist.init_process_group('nccl' if device_type == 'cuda' else 'gloo', init_method='env://', timeout=timeout)
        _health_group = dist.new_group(backend='gloo', timeout=timeout)
    return info


def _unanswered_ranks():
    """The ranks that do not reach a barrier within a few seconds. Only process 0 hears from every other
    process; the others wait on process 0 alone, for as long as the group's timeout, so they do not ask."""
    try:
        dist.monitored_barrier(group=_health_group, timeout=datetime.timedelta(seconds=PROBE_SECONDS),
                               wait_all_ranks=True)
    except RuntimeError as exc:
        found = re.search(r'Ranks? ([\d, ]+) failed to pass', str(exc))
        return found.group(1).strip() if found else None
    return None


@contextlib.contextmanager
def stall_watch(info, timeout_minutes):
    """Turn a collective that failed because another process stopped answering into one
    :class:`DistributedError` that says what happened: how long this process waited, and which process
    did not answer where process 0 can tell."""
    try:
        yield
    except RuntimeError as exc:
        if not (info.enabled and any(text in str(exc).lower() for text in _STALL_MESSAGES)):
            raise
        waited = f'process {info.rank} waited {timeout_minutes:g} min (the --dist-timeout) for the others'
        ranks = _unanswered_ranks() if info.is_main and _health_group is not None else None
        if ranks is not None:
            what = f'process rank {ranks} of this {info.world_size}-process run stopped answering: {waited}, then ' \
                   f'{PROBE_SECONDS} s for rank {ranks} alone'
        else:
            what = f'a process of this {info.world_size}-process run stopped answering: {waited}'
        raise DistributedError(f'{what}; the run ends here. A stuck data loader or file system is the usual cause. '
                               f'Torch reported: {str(exc).splitlines()[0][:200]}') from None


@contextlib.contextmanager
def main_process_first():
    """Process 0 runs the block before the others (it makes the files they then read). Where it fails, the
    others end at once with its reason, instead of waiting for it until the timeout."""
    if not (dist.is_available() and dist.is_initialized()):
        yield
        return
    failure = [None]
    if dist.get_rank() == 0:
        try:
            yield
        except Exception as exc:
            dist.broadcast_object_list([f'{exc}'], src=0)
            raise
        dist.broadcast_object_list(failure, src=0)
        return
    dist.broadcast_object_list(failure, src=0)
    if failure[0] is not None:
        raise DistributedError(f'process 0 could not prepare the data: {failure[0]}')
    yield


def all_reduce_sum(values, device):
    """Sum a list of numbers over all processes (a no-op in a one-process run)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown():
    global _health_group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _health_group = None
