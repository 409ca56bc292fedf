"""Run folders: the lock, what resuming may write where, failed writes, and the authors' checkpoint retention."""
import errno
import logging
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from timm.utils import CheckpointSaver
from torch import nn

from conftest import REPO_ROOT
from sglformer import files, run_folder
from sglformer.checkpoint import LAYOUTS, CheckpointError, read_checkpoint, resume_state
from sglformer.config import Config
from sglformer.files import FolderInUseError, WriteError
from sglformer.run_folder import RunFolder, RunFolderError

SETTINGS = Config({'model': 'tiny', 'lr': 0.1, 'epochs': 8})

# A run that opens a folder, writes epoch 0, says so, and keeps the folder until its stdin closes.
HOLDER = '''
import sys, torch
from torch import nn
from sglformer.config import Config
from sglformer.run_folder import RunFolder
model = nn.Linear(4, 2)
with RunFolder.open(sys.argv[1], 'timm', Config({'model': 'tiny'}), num_epochs=3) as folder:
    folder.log_epoch({'epoch': 0, 'eval_top1': 50.0})
    folder.save(0, 50.0, 90.0, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    print('ready', flush=True)
    sys.stdin.readline()
'''


class Trainee:
    """A tiny model and optimiser whose state changes every epoch, like a real run's."""

    def __init__(self, width=4, outputs=2):
        torch.manual_seed(0)
        self.model = nn.Linear(width, outputs)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)

    def epoch(self, folder, epoch, top1, top5=99.0, **state):
        self.optimizer.zero_grad()
        self.model(torch.ones(1, self.model.in_features)).sum().backward()
        self.optimizer.step()
        folder.log_epoch({'epoch': epoch, 'train_loss': 1.0 / (epoch + 1), 'eval_loss': 0.5, 'eval_top1': top1,
                          'eval_top5': top5, 'lr': 0.1, 'img_per_s': 100.0}, {'n_parameters': 10})
        return folder.save(epoch, top1, top5, model=self.model, optimizer=self.optimizer, **state)


def train(path, layout, top1s, first_epoch=0, trainee=None, num_epochs=None, **options):
    trainee = trainee or Trainee()
    with RunFolder.open(path, layout, SETTINGS, num_epochs=num_epochs or first_epoch + len(top1s), **options) as folder:
        for epoch, top1 in enumerate(top1s, first_epoch):
            trainee.epoch(folder, epoch, float(top1))
    return trainee


def resume(path, source, layout, top1s, trainee=None, num_epochs=None, **options):
    """Continue in ``path`` from the file ``source``, as training does: the model and optimiser first."""
    checkpoint = read_checkpoint(source)
    trainee = trainee or Trainee()
    state = resume_state(checkpoint, layout)
    trainee.model.load_state_dict(checkpoint[LAYOUTS[layout].weights_key])
    trainee.optimizer.load_state_dict(state['optimizer'])
    return train(path, layout, top1s, state['start_epoch'], trainee, num_epochs, resume_from=source,
                 checkpoint=checkpoint, **options)


def contents(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if not p.name.startswith('events.')}


def assert_same_run(folder, other):
    """The same files with the same bytes, checkpoints with the same contents (torch.save's bytes hold a
    random serialisation id); TensorBoard's events aside."""
    ours, theirs = contents(folder), contents(other)
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        if name.endswith(('.pth', '.pth.tar')):
            assert_equal(read_checkpoint(folder / name), read_checkpoint(other / name), name)
        else:
            assert ours[name] == theirs[name], name


def assert_equal(a, b, where):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            assert_equal(a[key], b[key], f'{where}[{key!r}]')
    else:
        assert a == b, where


def checkpoints(folder):
    """``{file: (epoch, metric)}`` of the timm files in ``folder``."""
    return {p.name: (read_checkpoint(p)['epoch'], read_checkpoint(p)['metric']) for p in folder.glob('*.pth.tar')}


@pytest.fixture
def messages():
    """What the package logs (the 'sglformer' logger may not propagate to pytest's handler)."""
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger('sglformer')
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    yield records
    logger.setLevel(level)
    logger.removeHandler(handler)


@pytest.fixture
def holder(tmp_path):
    """A live run holding ``tmp_path/run`` in another process."""
    path = tmp_path / 'run'
    process = subprocess.Popen([sys.executable, '-c', HOLDER, str(path)], cwd=REPO_ROOT, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert process.stdout.readline().strip() == 'ready'
        yield path, process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=60)


def resume_from_last(path, layout='timm'):
    last = path / LAYOUTS[layout].last
    return RunFolder.open(path, layout, SETTINGS, num_epochs=3, resume_from=last, checkpoint=read_checkpoint(last))


def test_a_second_run_into_a_live_folder_is_refused_and_changes_nothing(holder, messages):
    path, process = holder
    before = contents(path)
    for attempt in (lambda: RunFolder.open(path, 'timm', SETTINGS, num_epochs=3), lambda: resume_from_last(path)):
        with pytest.raises(FolderInUseError) as error:
            attempt()
        assert str(error.value).startswith(f'{path} is in use by another run (pid {process.pid} on '
                                           f'{socket.gethostname()}, started ')
    assert contents(path) == before
    process.stdin.close()  # the holder ends normally: it removes its lock
    assert process.wait(timeout=60) == 0
    assert not (path / 'run.lock').exists()
    resume_from_last(path).close()
    assert not any('taking over' in m for m in messages)


def test_the_lock_of_a_killed_run_is_taken_over_with_one_line(holder, messages):
    path, process = holder
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    assert f'"pid": {process.pid}' in (path / 'run.lock').read_text()
    with resume_from_last(path) as folder:
        assert f'"pid": {os.getpid()}' in (path / 'run.lock').read_text()
        assert folder.best['top1'] == 50.0
    takeovers = [m for m in messages if 'taking over' in m]
    assert takeovers == [f'{path}: taking over the lock of pid {process.pid} on {socket.gethostname()} (started '
                         + takeovers[0].split('(started ')[1]]
    assert takeovers[0].endswith('), which no longer runs')


def test_a_new_run_into_a_folder_holding_a_run_is_refused(tmp_path):
    path = tmp_path / 'run'
    train(path, 'timm', [10.0])
    before = contents(path)
    with pytest.raises(RunFolderError, match=r'already holds a run \(checkpoint-0.pth.tar, last.pth.tar, '
                                             r'model_best.pth.tar\), which a new run would overwrite: continue it '
                                             r'with --resume .*last.pth.tar, or start the new run in another folder'):
        RunFolder.open(path, 'timm', SETTINGS, num_epochs=3)
    assert contents(path) == before


def test_a_folder_without_checkpoints_is_started_again(tmp_path, messages):
    """A run that stopped before its first checkpoint (a bad sample, a full disk) has nothing to lose: the
    same command starts again in its folder, without the rows of the epoch that never got a checkpoint."""
    path = tmp_path / 'run'
    path.mkdir()
    (path / 'summary.csv').write_text('epoch,train_loss\n0,1.0\n')
    (path / 'args.yaml').write_text('model: other\n')
    train(path, 'timm', [10.0, 20.0])
    train(tmp_path / 'straight', 'timm', [10.0, 20.0])
    assert_same_run(path, tmp_path / 'straight')
    assert any('holds no checkpoint, only summary.csv, args.yaml of a run that stopped before its first epoch '
               'ended: starting again in it' in m for m in messages)


def test_nothing_is_written_before_the_checks(tmp_path):
    with pytest.raises(RunFolderError, match='--checkpoint-hist 0: keep at least 1'):
        RunFolder.open(tmp_path / 'new', 'timm', SETTINGS, num_epochs=3, checkpoint_hist=0)
    with pytest.raises(CheckpointError, match="unknown checkpoint format 'tim'; one of timm, dvs, mae"):
        RunFolder.open(tmp_path / 'new', 'tim', SETTINGS, num_epochs=3)
    weights_only = tmp_path / 'weights.pth'
    torch.save(nn.Linear(4, 2).state_dict(), weights_only)
    with pytest.raises(CheckpointError, match=f"{weights_only} has no 'epoch', 'optimizer', 'state_dict', so it is not "
                                             'a training checkpoint of the timm format; .* --initial-checkpoint'):
        RunFolder.open(tmp_path / 'new', 'timm', SETTINGS, num_epochs=3, resume_from=weights_only,
                       checkpoint=read_checkpoint(weights_only))
    assert not (tmp_path / 'new').exists()


def test_a_resume_that_waited_while_the_folder_moved_on_is_refused(tmp_path, monkeypatch):
    """The race held open: the resumed checkpoint is read, then, before this run takes the folder's lock, the
    run that held the folder writes another epoch and ends. Continuing would rewind the folder."""
    path = tmp_path / 'run'
    trainee = train(path, 'timm', [10, 20], num_epochs=4)
    checkpoint = read_checkpoint(path / 'last.pth.tar')  # what this run read, at epoch 1
    real_lock = run_folder.lock_folder

    def the_other_run_goes_on_first(folder):
        monkeypatch.setattr(run_folder, 'lock_folder', real_lock)
        resume(path, path / 'last.pth.tar', 'timm', [30], trainee=trainee, num_epochs=4)  # epoch 2, then it ends
        return real_lock(folder)

    monkeypatch.setattr(run_folder, 'lock_folder', the_other_run_goes_on_first)
    with pytest.raises(RunFolderError) as error:
        RunFolder.open(path, 'timm', SETTINGS, num_epochs=4, resume_from=path / 'last.pth.tar', checkpoint=checkpoint)
    assert str(error.value).startswith(f"{path} moved on while this run waited for it: {path / 'last.pth.tar'} held "
                                       'epoch 1 when this run read it and now holds epoch 2')
    assert read_checkpoint(path / 'last.pth.tar')['epoch'] == 2  # the other run's files are as it left them
    assert [line.split(',')[0] for line in (path / 'summary.csv').read_text().splitlines()] == ['epoch', '0', '1', '2']


def test_resume_into_a_folder_holding_another_run_is_refused_naming_both(tmp_path):
    train(tmp_path / 'a', 'timm', [10, 20])
    train(tmp_path / 'b', 'timm', [30])
    before = contents(tmp_path / 'b')
    with pytest.raises(RunFolderError) as error:
        resume(tmp_path / 'b', tmp_path / 'a' / 'last.pth.tar', 'timm', [40])
    assert str(error.value).startswith(f"cannot continue the run of {tmp_path / 'a'} from {tmp_path / 'a'}"
                                       f"/last.pth.tar in {tmp_path / 'b'}: {tmp_path / 'b'} already holds another run")
    assert contents(tmp_path / 'b') == before


def test_resume_into_a_new_folder_copies_the_history_up_to_the_checkpoint(tmp_path):
    a, b = tmp_path / 'a', tmp_path / 'b'
    train(a, 'timm', [10, 20, 30, 40])
    before = contents(a)
    resume(b, a / 'checkpoint-1.pth.tar', 'timm', [25, 35], num_epochs=4)
    assert contents(a) == before
    for name, head in (('summary.csv', 3), ('log.txt', 2)):  # up to epoch 1 (and the header)
        copied, own = (a / name).read_text().splitlines(), (b / name).read_text().splitlines()
        assert own[:head] == copied[:head] and len(own) == head + 2
    assert checkpoints(b) == {'last.pth.tar': (3, 35.0), 'checkpoint-2.pth.tar': (2, 25.0),
                              'checkpoint-3.pth.tar': (3, 35.0), 'model_best.pth.tar': (3, 35.0)}


def test_in_place_resume_from_another_file_than_the_latest_is_refused(tmp_path):
    train(tmp_path / 'a', 'timm', [10, 20, 30])
    before = contents(tmp_path / 'a')
    with pytest.raises(RunFolderError, match=r"from .*checkpoint-1.pth.tar \(epoch 1\): only the folder's latest "
                                             r'checkpoint, last.pth.tar, continues in place'):
        resume(tmp_path / 'a', tmp_path / 'a' / 'checkpoint-1.pth.tar', 'timm', [40])
    assert contents(tmp_path / 'a') == before


def test_rows_after_the_checkpoint_are_dropped_and_the_folder_equals_an_uninterrupted_one(tmp_path):
    top1s = [10, 30, 20, 40, 35, 50]
    train(tmp_path / 'straight', 'timm', top1s)
    stopped = tmp_path / 'stopped'
    train(stopped, 'timm', top1s[:3], num_epochs=6)
    for name in ('summary.csv', 'log.txt'):  # a crash after epoch 3's rows, before its checkpoint, in its next row
        row = (tmp_path / 'straight' / name).read_text().splitlines(keepends=True)[4 if name == 'summary.csv' else 3]
        with open(stopped / name, 'a') as f:
            f.write(row + row[:7])
    resume(stopped, stopped / 'last.pth.tar', 'timm', top1s[3:], num_epochs=6)
    assert_same_run(stopped, tmp_path / 'straight')


@pytest.mark.parametrize('failure', ['oserror', 'torch'])
def test_a_full_disk_at_the_checkpoint_gives_one_error_and_keeps_the_previous(tmp_path, monkeypatch, failure):
    path = tmp_path / 'run'
    trainee = Trainee()
    real_save = torch.save

    def full_disk(obj, f):
        f.write(b'x' * 10)
        if failure == 'oserror':
            raise OSError(errno.ENOSPC, 'No space left on device')
        raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598')

    with RunFolder.open(path, 'timm', SETTINGS, num_epochs=3) as folder:
        trainee.epoch(folder, 0, 10.0)
        monkeypatch.setattr(torch, 'save', full_disk)
        Usage = namedtuple('Usage', 'total used free')
        monkeypatch.setattr(files.shutil, 'disk_usage', lambda _: Usage(10 ** 6, 10 ** 6 - 50, 50))
        with pytest.raises(WriteError) as error:
            trainee.epoch(folder, 1, 20.0)
        monkeypatch.setattr(torch, 'save', real_save)
    # 80 bytes: weight and bias (10 float32) and their momentum buffers
    assert str(error.value) == (f"could not write {path / 'last.pth.tar'}: no space left on the device (about 80 "
                                "bytes needed, 50 bytes free); the run folder's earlier files are intact: free some "
                                f"space (or choose another --output) and resume with --resume {path / 'last.pth.tar'}")
    assert checkpoints(path) == {'last.pth.tar': (0, 10.0), 'checkpoint-0.pth.tar': (0, 10.0),
                                 'model_best.pth.tar': (0, 10.0)}
    assert not [p for p in path.iterdir() if p.name.endswith('.tmp')]


def test_a_failed_log_write_leaves_no_half_row(tmp_path, monkeypatch):
    path = tmp_path / 'run'
    trainee = Trainee()
    real_fsync = os.fsync

    def failing(handle):
        raise OSError(errno.EIO, 'Input/output error')

    with RunFolder.open(path, 'timm', SETTINGS, num_epochs=3) as folder:
        trainee.epoch(folder, 0, 10.0)
        logs = lambda: [(path / name).read_bytes() for name in ('summary.csv', 'log.txt')]  # noqa: E731
        before = logs()
        monkeypatch.setattr(files.os, 'fsync', failing)
        with pytest.raises(WriteError, match=f"could not write {path / 'summary.csv'}: Input/output error$"):
            trainee.epoch(folder, 1, 20.0)
        monkeypatch.setattr(files.os, 'fsync', real_fsync)
        assert logs() == before


def test_a_failed_tensorboard_write_names_its_folder(tmp_path, monkeypatch):
    trainee = Trainee()
    with RunFolder.open(tmp_path / 'run', 'timm', SETTINGS, num_epochs=3, log_dir=tmp_path / 'tb') as folder:
        def full(*args):
            raise OSError(errno.ENOSPC, 'No space left on device')

        monkeypatch.setattr(folder.writer, 'flush', full)
        with pytest.raises(WriteError, match=f"^could not write {tmp_path / 'tb'}: no space left on the device "
                                                 r'\(\d+\.\d (KiB|MiB|GiB) free\)'):
            trainee.epoch(folder, 0, 10.0)
        monkeypatch.undo()


@pytest.fixture
def tiny_filesystem(tmp_path):
    mount_point = tmp_path / 'tmpfs'
    mount_point.mkdir()
    done = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', str(mount_point)], capture_output=True,
                          text=True)
    if done.returncode:
        pytest.skip(f'cannot mount a 1 MiB tmpfs here ({done.stderr.strip() or done.returncode}): a real full '
                    'file system is not tested')
    yield mount_point
    subprocess.run(['umount', str(mount_point)], check=True)


def test_a_really_full_file_system(tiny_filesystem):
    path = tiny_filesystem / 'run'
    trainee = Trainee(width=256, outputs=256)  # 514 KiB a checkpoint: a second one does not fit beside it
    with RunFolder.open(path, 'timm', SETTINGS, num_epochs=3, log_dir=tiny_filesystem.parent / 'tb') as folder:
        trainee.epoch(folder, 0, 10.0)
        with pytest.raises(WriteError, match=r'^could not write .*/last.pth.tar: no space left on the device '
                                                 r'\(about 514.0 KiB needed, \d+.\d KiB free\)'):
            trainee.epoch(folder, 1, 20.0)
    assert checkpoints(path) == {'last.pth.tar': (0, 10.0), 'checkpoint-0.pth.tar': (0, 10.0),
                                 'model_best.pth.tar': (0, 10.0)}
    assert not [p for p in path.iterdir() if p.name.endswith('.tmp')]


def test_temporary_files_of_a_killed_writer_are_removed_on_open(tmp_path, messages):
    path = tmp_path / 'run'
    train(path, 'timm', [10, 20])
    orphans = ['.last.pth.tar.k2j4_x.tmp', '.model_best.pth.tar.link.tmp', 'tmp.pth.tar', '.log.txt.9a8b7c.tmp']
    for name in orphans:
        (path / name).write_bytes(b'half')
    resume_from_last(path).close()
    assert not [name for name in orphans if (path / name).exists()]
    assert ('removed .last.pth.tar.k2j4_x.tmp, .log.txt.9a8b7c.tmp, .model_best.pth.tar.link.tmp, tmp.pth.tar, '
            'left by an interrupted write') in messages


def test_timm_keeps_the_best_n_by_top1_as_timms_own_saver(tmp_path):
    top1s = [50, 70, 60, 70, 65, 80, 40, 70]
    train(tmp_path / 'ours', 'timm', top1s, checkpoint_hist=3)
    # ties keep the earlier epoch: epoch 3 (70) displaces epoch 0 (50), epoch 7 (70) does not enter
    expected = {'checkpoint-5.pth.tar': (5, 80.0), 'checkpoint-1.pth.tar': (1, 70.0),
                'checkpoint-3.pth.tar': (3, 70.0), 'model_best.pth.tar': (5, 80.0), 'last.pth.tar': (7, 70.0)}
    assert checkpoints(tmp_path / 'ours') == expected

    timms = tmp_path / 'timm'
    timms.mkdir()
    trainee = Trainee()
    saver = CheckpointSaver(trainee.model, trainee.optimizer, checkpoint_dir=str(timms), max_history=3)
    for epoch, top1 in enumerate(top1s):
        saver.save_checkpoint(epoch, metric=float(top1))
    assert checkpoints(timms) == expected
    continued = CheckpointSaver(trainee.model, trainee.optimizer, checkpoint_dir=str(tmp_path / 'ours'),
                                max_history=3)
    assert continued.load_state_dict_from_checkpoint(str(tmp_path / 'ours' / 'last.pth.tar'))
    assert [(Path(f).name, m) for f, m in continued.checkpoint_files] == [(Path(f).name, m)
                                                                          for f, m in saver.checkpoint_files]


def test_timm_container_keys(tmp_path):
    trainee = Trainee()
    with RunFolder.open(tmp_path / 'run', 'timm', SETTINGS, num_epochs=1) as folder:
        trainee.epoch(folder, 0, 10.0, scaler=torch.amp.GradScaler('cpu'))
    last = read_checkpoint(tmp_path / 'run' / 'last.pth.tar')
    assert set(last) == {'epoch', 'arch', 'state_dict', 'optimizer', 'version', 'args', 'metric', 'amp_scaler',
                         'saver'}
    assert (last['arch'], last['version'], vars(last['args'])) == ('tiny', 2, SETTINGS.to_dict())
    assert last['amp_scaler']['scale'] == 65536.0


def crash_at_copy(monkeypatch, target, epoch):
    """The copy of epoch ``epoch``'s latest checkpoint named ``target`` dies (as a kill -9 would) before it
    is made."""
    real = run_folder.link_atomically

    def crashing(source, destination):
        if destination.name == target and read_checkpoint(source)['epoch'] == epoch:
            raise KeyboardInterrupt('simulated kill')
        real(source, destination)

    monkeypatch.setattr(run_folder, 'link_atomically', crashing)


@pytest.mark.parametrize('cut', ['between runs', 'before the numbered copy', 'before model_best'])
def test_a_resumed_timm_run_keeps_what_an_uninterrupted_one_keeps(tmp_path, monkeypatch, cut):
    top1s = [50, 70, 60, 70, 65, 80, 40, 75, 90, 10]
    train(tmp_path / 'straight', 'timm', top1s, checkpoint_hist=3)
    stopped = tmp_path / 'stopped'
    if cut == 'between runs':
        train(stopped, 'timm', top1s[:5], num_epochs=10, checkpoint_hist=3)
    else:
        crash_at_copy(monkeypatch, 'checkpoint-5.pth.tar' if cut == 'before the numbered copy' else
                      'model_best.pth.tar', epoch=5)
        with pytest.raises(KeyboardInterrupt):
            train(stopped, 'timm', top1s[:6], num_epochs=10, checkpoint_hist=3)
        monkeypatch.undo()
        assert checkpoints(stopped)['model_best.pth.tar'] == (1, 70.0)
    last_epoch = read_checkpoint(stopped / 'last.pth.tar')['epoch']
    resume(stopped, stopped / 'last.pth.tar', 'timm', top1s[last_epoch + 1:], num_epochs=10, checkpoint_hist=3)
    assert checkpoints(stopped) == checkpoints(tmp_path / 'straight')
    assert sorted(p.name for p in stopped.glob('*.pth.tar')) == ['checkpoint-5.pth.tar', 'checkpoint-7.pth.tar',
                                                                 'checkpoint-8.pth.tar', 'last.pth.tar',
                                                                 'model_best.pth.tar']


def test_dvs_writes_the_best_on_improvement_and_the_final_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / 'run'
    crash_at_copy(monkeypatch, 'checkpoint_max_test_acc1.pth', epoch=1)  # dies right after epoch 1's latest checkpoint
    with pytest.raises(KeyboardInterrupt):
        train(path, 'dvs', [0.0, 30.0], num_epochs=4)  # 0.0 is no best: the authors' maximum starts at 0
    monkeypatch.undo()
    assert sorted(p.name for p in path.glob('*.pth')) == ['checkpoint_latest.pth']
    resume(path, path / 'checkpoint_latest.pth', 'dvs', [20.0, 25.0], num_epochs=4)
    assert sorted(p.name for p in path.glob('*.pth')) == ['checkpoint_3.pth', 'checkpoint_latest.pth',
                                                          'checkpoint_max_test_acc1.pth']
    best = read_checkpoint(path / 'checkpoint_max_test_acc1.pth')
    assert set(best) == {'model', 'optimizer', 'lr_scheduler', 'epoch', 'args', 'max_test_acc1',
                         'test_acc5_at_max_test_acc1'}
    assert (best['epoch'], best['max_test_acc1'], best['test_acc5_at_max_test_acc1']) == (1, 30.0, 99.0)
    final = read_checkpoint(path / 'checkpoint_3.pth')
    assert (final['epoch'], final['max_test_acc1']) == (3, 30.0)
    assert torch.equal(final['model']['weight'], read_checkpoint(path / 'checkpoint_latest.pth')['model']['weight'])


def test_mae_keeps_improvements_of_the_last_20_epochs(tmp_path):
    top1s = [10.0] * 25
    top1s[3], top1s[6], top1s[8], top1s[9], top1s[12] = 50.0, 40.0, 60.0, 60.0, 70.0
    trainee = Trainee()
    path = tmp_path / 'run'
    with RunFolder.open(path, 'mae', SETTINGS, num_epochs=25) as folder:
        for epoch, top1 in enumerate(top1s):
            trainee.epoch(folder, epoch, top1, scaler=torch.amp.GradScaler('cpu'))
    # epoch 3 is outside the window (epoch > 25 - 20), 6 is below the maximum, 9 only equals it
    assert sorted(p.name for p in path.glob('*.pth')) == ['checkpoint-12.pth', 'checkpoint-8.pth',
                                                          'checkpoint-last.pth']
    last = read_checkpoint(path / 'checkpoint-last.pth')
    assert set(last) == {'model', 'optimizer', 'epoch', 'scaler', 'args', 'max_accuracy', 'max_accuracy_epoch'}
    assert (last['epoch'], last['max_accuracy'], last['max_accuracy_epoch']) == (24, 70.0, 12)
    assert read_checkpoint(path / 'checkpoint-8.pth')['max_accuracy'] == 60.0
    first = (path / 'log.txt').read_text().splitlines()[0]
    assert first == ('{"epoch": 0, "train_loss": 1.0, "test_loss": 0.5, "test_acc1": 10.0, "test_acc5": 99.0, '
                     '"train_lr": 0.1, "train_img_per_s": 100.0, "n_parameters": 10}')


def test_save_before_log_epoch_is_a_programming_error(tmp_path):
    trainee = Trainee()
    with RunFolder.open(tmp_path / str(uuid.uuid4()), 'dvs', SETTINGS, num_epochs=2) as folder:
        with pytest.raises(ValueError, match=r'log_epoch\(\) of epoch 0 must come before save\(\)'):
            folder.save(0, 1.0, 2.0, model=trainee.model, optimizer=trainee.optimizer)
