"""Loading every container the authors and timm write, safely; writing atomically."""
import argparse
import os
import pickle

import pytest
import timm
import torch

from sglformer import CheckpointError, load_checkpoint
from sglformer.checkpoint import read_checkpoint, save_checkpoint


def small_model(**kwargs):
    return timm.create_model('sglformer_cifar10', embed_dims=48, num_heads=4, T=2, **kwargs)


@pytest.fixture
def trained():
    model = small_model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return model


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def containers(model):
    state = model.state_dict()
    prefixed = {'module.' + k: v for k, v in state.items()}
    args = argparse.Namespace(model='sglformer', lr=1e-3, mean=[0.5, 0.5, 0.5])
    return {
        'raw': state,
        'timm_saver': {'epoch': 3, 'arch': 'sglformer', 'state_dict': state, 'optimizer': {'state': {}, 'param_groups': []},
                       'version': 2, 'args': args, 'metric': 50.0},
        'imagenet_ddp': {'model': prefixed, 'optimizer': {}, 'epoch': 1, 'scaler': {'scale': 65536.0}, 'args': args},
        'dvs_ddp': {'model': prefixed, 'optimizer': {}, 'lr_scheduler': {}, 'epoch': 5, 'args': args,
                    'max_test_acc1': 80.0, 'test_acc5_at_max_test_acc1': 99.0},
    }


@pytest.mark.parametrize('kind', ['raw', 'timm_saver', 'imagenet_ddp', 'dvs_ddp'])
def test_every_container_loads(tmp_path, trained, kind):
    path = tmp_path / f'{kind}.pth'
    torch.save(containers(trained)[kind], path)
    fresh = small_model()
    load_checkpoint(fresh, path)
    assert_same_weights(fresh, trained)


def test_ema_weights_on_request(tmp_path, trained):
    plain = small_model()
    torch.save({'state_dict': plain.state_dict(), 'state_dict_ema': trained.state_dict()}, tmp_path / 'ema.pth')
    fresh = small_model()
    load_checkpoint(fresh, tmp_path / 'ema.pth', use_ema=True)
    assert_same_weights(fresh, trained)
    load_checkpoint(fresh, tmp_path / 'ema.pth')
    assert_same_weights(fresh, plain)
    torch.save({'state_dict': plain.state_dict()}, tmp_path / 'no_ema.pth')
    with pytest.raises(CheckpointError, match='state_dict_ema'):
        load_checkpoint(fresh, tmp_path / 'no_ema.pth', use_ema=True)


def test_head_of_another_shape(tmp_path, trained):
    torch.save(trained.state_dict(), tmp_path / 'c10.pth')
    model = small_model(num_classes=100)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(model, tmp_path / 'c10.pth')
    message = str(err.value)
    assert 'head.weight: checkpoint (10, 48), model (100, 48)' in message
    assert 'drop the classifier head' in message
    head_before = model.head.weight.clone()
    load_checkpoint(model, tmp_path / 'c10.pth', drop_mismatched_head=True)
    assert torch.equal(model.head.weight, head_before)
    assert torch.equal(model.stem.conv.conv3x3.weight, trained.stem.conv.conv3x3.weight)


def test_wrong_variant_lists_the_problem_keys(tmp_path, trained):
    torch.save(trained.state_dict(), tmp_path / 'cifar.pth')
    other = timm.create_model('sglformer_ima_8_384', embed_dims=48, num_heads=4, depths=3, T=2)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(other, tmp_path / 'cifar.pth')
    lines = str(err.value).splitlines()
    assert len(lines) <= 5
    assert any(line.strip().startswith('missing') or ' missing: ' in line for line in lines)
    assert any(' unexpected: ' in line for line in lines)
    assert '+' in str(err.value) and 'more' in str(err.value)


def test_t_is_named_only_where_t_alone_differs(tmp_path):
    dvs = timm.create_model('sglformer_dvs128gesture', embed_dims=48, num_heads=4, T=2)
    torch.save(dvs.state_dict(), tmp_path / 'gesture.pth')
    at_other_t = timm.create_model('sglformer_dvs128gesture', embed_dims=48, num_heads=4, T=3)
    with pytest.raises(CheckpointError, match='trained with T=2 time steps and this model has T=3'):
        load_checkpoint(at_other_t, tmp_path / 'gesture.pth')
    other_variant = timm.create_model('sglformer_cifar10dvs', embed_dims=48, num_heads=4, T=3)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(other_variant, tmp_path / 'gesture.pth')
    assert 'does not fit' in str(err.value) and 'head.weight' in str(err.value) and 'T=' not in str(err.value)


def test_non_strict_loads_the_overlap(tmp_path, trained):
    state = trained.state_dict()
    del state['head.weight']
    torch.save(state, tmp_path / 'partial.pth')
    fresh = small_model()
    with pytest.raises(CheckpointError, match='1 missing: head.weight'):
        load_checkpoint(fresh, tmp_path / 'partial.pth')
    load_checkpoint(fresh, tmp_path / 'partial.pth', strict=False)
    assert torch.equal(fresh.bn.weight, trained.bn.weight)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match='does not exist') as err:
        load_checkpoint(small_model(), tmp_path / 'nope.pth')
    assert str(tmp_path / 'nope.pth') in str(err.value)


def test_truncated_file(tmp_path, trained):
    path = tmp_path / 'full.pth'
    torch.save(trained.state_dict(), path)
    data = path.read_bytes()
    (tmp_path / 'cut.pth').write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match='cut.pth') as err:
        load_checkpoint(small_model(), tmp_path / 'cut.pth')
    assert '\n' not in str(err.value)


def test_not_a_checkpoint(tmp_path):
    (tmp_path / 'notes.txt').write_text('epochs: 400\n')
    with pytest.raises(CheckpointError, match='notes.txt') as err:
        load_checkpoint(small_model(), tmp_path / 'notes.txt')
    assert '\n' not in str(err.value)
    torch.save({'epoch': 3, 'lr': 0.1}, tmp_path / 'meta.pth')
    with pytest.raises(CheckpointError, match='no model weights'):
        load_checkpoint(small_model(), tmp_path / 'meta.pth')


class _RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


@pytest.mark.filterwarnings('ignore:Detected pickle protocol')  # the plain pickle below is protocol 4
def test_code_executing_pickle_is_refused_without_running(tmp_path, trained):
    marker = tmp_path / 'pwned'
    path = tmp_path / 'evil.pth'
    torch.save({'state_dict': trained.state_dict(), 'payload': _RunsCode(marker)}, path)
    with pytest.raises(CheckpointError, match='system') as err:
        load_checkpoint(small_model(), path)
    assert 'refused' in str(err.value)
    assert not marker.exists()
    # and the same with a plain pickle (no zip container)
    with open(tmp_path / 'evil.pkl', 'wb') as f:
        pickle.dump(_RunsCode(marker), f)
    with pytest.raises(CheckpointError):
        read_checkpoint(tmp_path / 'evil.pkl')
    assert not marker.exists()


def test_save_is_atomic(tmp_path, monkeypatch, trained):
    path = tmp_path / 'last.pth.tar'
    save_checkpoint({'state_dict': trained.state_dict(), 'epoch': 1}, path)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, 'save', crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({'state_dict': {}, 'epoch': 2}, path)
    monkeypatch.undo()
    assert read_checkpoint(path)['epoch'] == 1
    assert [p.name for p in tmp_path.iterdir()] == ['last.pth.tar']
