"""The bounded skipping of training samples whose file cannot be read (the ``max_unreadable_samples``
option)."""
import logging
import multiprocessing

from torch.utils.data import Dataset

from ..distributed import all_reduce_sum
from .errors import UnreadableSampleError

_logger = logging.getLogger(__name__)


class SkipUnreadable(Dataset):
    """``dataset`` where a sample that cannot be read is replaced by the next readable one (the batch
    keeps its size), for at most ``limit`` distinct samples over the whole run, each announced by one
    warning; the next unreadable sample ends the run with an error that lists the skipped files.

    The record of skipped samples is shared memory made in the process that builds the dataset, so
    that DataLoader worker processes, made afresh every epoch, all count against the one limit (under
    torchrun each training process keeps its own record). It is made with multiprocessing's default
    start method, the one DataLoader uses unless given a ``multiprocessing_context``."""

    def __init__(self, dataset, limit, title):
        self.dataset = dataset
        self.limit = limit
        self.title = title
        self._lock = multiprocessing.Lock()
        self._count = multiprocessing.RawValue('q', 0)
        self._skipped = multiprocessing.RawArray('q', limit)

    def __len__(self):
        return len(self.dataset)

    def __getattr__(self, name):
        # What the wrapped dataset tells about itself: classes, targets, samples.
        if name == 'dataset':  # not set yet, while unpickling in a worker
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index):
        size = len(self.dataset)
        for offset in range(size):
            candidate = (index + offset) % size
            if self._count.value and candidate in self.skipped_indices():
                continue
            try:
                return self.dataset[candidate]
            except UnreadableSampleError as error:
                self._skip(candidate, error)
        raise UnreadableSampleError(f'none of the {size} training samples of {self.title} can be read; the '
                                    f"skipped files: {', '.join(self.skipped_files())}")

    def skipped_indices(self):
        """Indices of the samples skipped so far, in the order they were met."""
        with self._lock:
            return list(self._skipped[:self._count.value])

    def skipped_files(self):
        return self._files(self.skipped_indices())

    def check_all_processes(self, device):
        """Under torchrun each process skips its own samples: end the run where all of them together skipped
        more than the limit (called between epochs, where the processes meet anyway)."""
        skipped = self.skipped_files()
        total = int(all_reduce_sum([len(skipped)], device)[0])
        if total > self.limit:
            raise UnreadableSampleError(f'the processes of this run skipped {total} unreadable training samples of '
                                        f'{self.title} together, more than max_unreadable_samples ({self.limit}); '
                                        f"this process skipped {', '.join(skipped) or 'none'}")

    def _files(self, indices):
        samples = getattr(self.dataset, 'samples', None)  # torchvision's (path, target) pairs
        return [str(samples[i][0]) if samples is not None else f'sample {i}' for i in indices]

    def _skip(self, index, error):
        with self._lock:
            count = self._count.value
            if index in self._skipped[:count]:  # another worker met it first
                return
            if count >= self.limit:
                raise UnreadableSampleError(f'{error}\n{self._limit_reached()}', path=error.path) from None
            self._skipped[count] = index
            self._count.value = count + 1
        _logger.warning('%s: unreadable training sample %d of at most %d (max_unreadable_samples) skipped, the next '
                        'readable sample is used instead: %s', self.title, count + 1, self.limit, error)

    def _limit_reached(self):
        if self.limit == 0:
            return ('max_unreadable_samples is 0, so the first unreadable training sample ends the run; set it to N '
                    'to skip up to N of them (each is replaced by the next readable sample)')
        skipped = self._files(self._skipped[:self.limit])  # the caller holds the lock
        return (f'max_unreadable_samples is {self.limit}, and the run has skipped that many unreadable training '
                f"samples already: {', '.join(skipped)}")

