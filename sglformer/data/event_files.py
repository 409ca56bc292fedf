"""Making the files of the event datasets: CIFAR10-DVS's original recordings converted to events_np/, and
the frames of every events_np/ sample integrated by spikingjelly's function. Each file is written under a
temporary name and renamed when complete, so that an interrupted run leaves only whole files, and a full
disk ends in one message naming the folder (see :mod:`sglformer.data.dvs` for why this is done here)."""
import logging
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from spikingjelly import configure as spikingjelly_configure
from spikingjelly.datasets import integrate_events_by_fixed_frames_number, np_savez
from torchvision.datasets.utils import extract_archive

from ..files import writing
from .errors import DatasetError, UnreadableSampleError

_logger = logging.getLogger(__name__)

EVENT_ARRAYS = ('t', 'x', 'y', 'p')
_NPZ_READ_LOCK = threading.Lock()


def convert_cifar10_dvs(root):
    """extract/ from download/ (when absent), then events_np/ from extract/; each is written under a
    temporary name and renamed when complete."""
    extract = root / 'extract'
    if not extract.is_dir():
        partial = root / 'extract.partial'
        shutil.rmtree(partial, ignore_errors=True)
        for archive in sorted((root / 'download').glob('*.zip')):
            _logger.info('CIFAR10-DVS: extracting %s', archive)
            with writing(partial, advice=f'free some space, delete {partial} and run again'):
                extract_archive(str(archive), str(partial))
        partial.rename(extract)
    folders = sorted(path for path in extract.iterdir() if path.is_dir())
    files = [path for folder in folders for path in sorted(folder.glob('*.aedat'))]
    if not files:
        raise DatasetError(f'{extract} holds no <class>/*.aedat files; delete it to have it extracted again from '
                           f"{root / 'download'}")
    events = root / 'events_np'
    partial = root / 'events_np.partial'
    shutil.rmtree(partial, ignore_errors=True)
    for folder in {path.parent.name for path in files}:
        (partial / folder).mkdir(parents=True)
    _logger.info('CIFAR10-DVS: converting %d files from %s to %s', len(files), extract, events)

    def convert(path):
        try:
            events_of_file = read_cifar10_dvs_events(path)
        except (DatasetError, OSError) as exc:
            raise DatasetError(f'{exc}. Delete {extract} to have it extracted again from {root / "download"} '
                               '(and download that archive again if this recurs)') from None
        with writing(partial, advice=f'free some space and run again (it starts afresh in {partial})'):
            np_savez(partial / path.parent.name / f'{path.stem}.npz', **events_of_file)

    run_in_threads(convert, files)
    partial.rename(events)


def read_cifar10_dvs_events(path):
    """The events of one original CIFAR10-DVS file (AER-DAT 2.0: '#' header lines, then big-endian
    32-bit address/timestamp pairs) as spikingjelly stores them: ``t``, ``x = 127 - row``,
    ``y = 127 - column`` and ``p = 1 - polarity``, where the address holds the polarity in bit 0, the
    column in bits 1-7 and the row in bits 8-14."""
    data = Path(path).read_bytes()
    body = data[_header_length(data):]
    if len(body) % 8:
        raise DatasetError(f'{path}: {len(body)} bytes of events, not a multiple of 8 (a truncated file?)')
    words = np.frombuffer(body, dtype='>u4').astype(np.uint32)
    address, timestamp = words[0::2], words[1::2]
    column = (address >> 1) & 0x7F
    row = (address >> 8) & 0x7F
    return {'t': timestamp, 'x': 127 - row, 'y': 127 - column, 'p': 1 - (address & 1).astype(np.int64)}


def _header_length(data):
    """Bytes taken by the leading text lines that start with '#' (after leading blanks)."""
    offset = 0
    while offset < len(data):
        end = data.find(b'\n', offset)
        line = data[offset:] if end < 0 else data[offset:end + 1]
        try:
            text = line.decode().strip()
        except UnicodeDecodeError:
            break
        if not text.startswith('#'):
            break
        offset += len(line)
    return offset


def run_in_threads(function, items):
    """``function(item)`` for every item, on as many threads as spikingjelly uses for preprocessing; the
    first exception (in item order) cancels the items not started and is raised."""
    workers = max(1, min(os.cpu_count() or 1, spikingjelly_configure.max_threads_number_for_datasets_preprocess))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(function, item) for item in items]
        try:
            for future in futures:
                future.result()
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise


def read_events(path):
    """The t, x, y and p arrays of an events_np file. One thread at a time: numpy's parser of the arrays'
    headers (ast.literal_eval) has failed now and then when threads called it together on CPython 3.11.7,
    whichever spikingjelly is installed."""
    with _NPZ_READ_LOCK:
        archive = np.load(path)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError('a single array, not an .npz archive of arrays')
        with archive:
            missing = [name for name in EVENT_ARRAYS if name not in archive.files]
            if missing:
                raise ValueError(f"no {', '.join(missing)} array; it holds {', '.join(archive.files) or 'none'}")
            return {name: archive[name] for name in EVENT_ARRAYS}


def _missing_frames(events, frames):
    """Samples of events_np (paths relative to it) without a frames file."""
    expected = {path.relative_to(events) for path in events.rglob('*.npz')}
    present = {path.relative_to(frames) for path in frames.rglob('*.npz')} if frames.is_dir() else set()
    return sorted(expected - present)


def integrate_missing(root, info, frames, frames_number):
    """The frames of each events_np sample that has no frames file (all of them the first time), by
    spikingjelly's integration function; each file is written under a temporary name, then renamed, so
    that an interrupted run leaves only whole files."""
    events = root / 'events_np'
    missing = _missing_frames(events, frames)
    if not missing:
        return
    height, width = info.spikingjelly_class().get_H_W()
    _logger.info('%s: integrating the events of %d samples into %d frames each under %s', info.title,
                 len(missing), frames_number, frames)
    start = time.perf_counter()

    def integrate(sample):
        try:
            stack = integrate_events_by_fixed_frames_number(read_events(events / sample), 'number', frames_number,
                                                            height, width)
        except Exception as exc:  # a truncated or foreign file, missing arrays, events off the sensor
            raise UnreadableSampleError(_unreadable_events(root, info, events / sample, exc),
                                        path=events / sample) from None
        target = frames / sample
        partial = target.with_name(f'.{target.name}.partial')
        with writing(frames, advice=f'free some space and run again: the frames already made in {frames} are kept'):
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(partial, 'wb') as f:
                np_savez(f, frames=stack)
            partial.replace(target)

    run_in_threads(integrate, missing)
    _logger.info('%s: frames ready after %.0f s', info.title, time.perf_counter() - start)


def _unreadable_events(root, info, path, exc):
    """The error message for an events_np file that cannot be used, with the way to rebuild it that the
    data folder allows: events_np/ is made from the original files, never from frames."""
    events, download = root / 'events_np', root / 'download'
    extracted = info.converts_here and any((root / 'extract').glob('*/*.aedat'))
    downloaded = all((download / name).is_file() for name, _, _ in info.spikingjelly_class().resource_url_md5())
    if extracted or downloaded:
        rebuild = (f'or delete {events}: the next run converts the original files in '
                   f"{root / 'extract' if extracted else download} again")
    else:
        rebuild = (f'or, to have the sample back, put the original files ({info.origin}) into {download}/ and delete '
                   f'{events}, so that the next run converts them again')
    return (f'{path} cannot be read ({type(exc).__name__}: {exc}); it is a {info.title} sample, in the events that '
            f'the frames are made from, and cannot be made from the frames. Delete it to go on without the sample, '
            f'{rebuild}')
