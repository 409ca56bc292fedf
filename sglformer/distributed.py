"""torch.distributed set-up for runs under ``torchrun`` (env:// rendezvous), and one-process runs."""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


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


def default_device():
    return 'cuda' if torch.cuda.is_available() else 'cpu'


def init_distributed(device_type):
    """Join the process group that ``torchrun`` describes in the environment (nccl on CUDA, gloo
    on CPU); a plain ``python train.py`` is a group of one and needs no set-up."""
    world_size = int(os.environ.get('WORLD_SIZE', 1))
    if world_size <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ['RANK']), world_size, int(os.environ.get('LOCAL_RANK', 0)))
    if not dist.is_initialized():
        if device_type == 'cuda':
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group('nccl' if device_type == 'cuda' else 'gloo', init_method='env://')
    return info


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
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
