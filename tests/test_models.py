"""The models against the authors' numbers (goldens) and state-dict layouts (manifests).

The goldens run on the CPU; ``SGLFORMER_TEST_DEVICE=cuda`` runs them on a GPU (TF32 off), where
spikingjelly's CUDA neuron kernels (CuPy, or spikingjelly 2's) are tested too.
"""
import os
import re

import pytest
import timm
import torch

import sglformer
from conftest import GOLDEN_MODELS, shared_files
from sglformer.neuron import NEURON_BACKENDS

# Outputs and BatchNorm statistics must match to 1e-5 relative (as asked). Gradients are held to
# 1e-4: the authors' own code, run in this environment (torch 2.14 CPU), differs from the goldens
# by up to 7.6e-5 in early-layer gradients, because BatchNorm's backward amplifies summation-order
# differences between torch builds. A single flipped spike moves gradients by 1e-1 or more.
OUTPUT_TOL = 1e-5
GRAD_TOL = 1e-4

DEVICE = torch.device(os.environ.get('SGLFORMER_TEST_DEVICE', 'cpu'))
if DEVICE.type == 'cuda':
    torch.backends.cudnn.allow_tf32 = False
# (neuron implementation, spikingjelly backend, units recomputing) for the goldens: every implementation
# must match them. 'auto' is spikingjelly's fastest on the device: its Torch code on the CPU; on CUDA CuPy
# (0.0.0.0.14) or spikingjelly 2's own kernels.
NEURONS = [pytest.param('spikingjelly', 'auto', False, id='spikingjelly'),
           pytest.param('spikingjelly', 'auto', True, id='spikingjelly-recompute'),
           pytest.param('fused', 'auto', True, id='fused')]
if DEVICE.type == 'cuda' and 'cupy' in NEURON_BACKENDS:
    NEURONS.append(pytest.param('spikingjelly', 'torch', True, id='spikingjelly-torch-recompute'))


def relative_error(actual, reference):
    actual = actual.detach().cpu()
    return ((actual.double() - reference.double()).abs().max() / max(1.0, reference.abs().max().item())).item()


@pytest.mark.parametrize('neuron, backend, recompute', NEURONS)
@pytest.mark.parametrize('path', shared_files('golden', '*.pt'))
def test_golden(path, neuron, backend, recompute):
    golden = torch.load(path, weights_only=True)
    model = timm.create_model(GOLDEN_MODELS[golden['arch']], neuron=neuron, neuron_backend=backend,
                              recompute=recompute, **golden['kwargs'])
    model.load_state_dict(golden['state_dict'], strict=True)
    assert sglformer.count_parameters(model) == golden['n_params']
    model.to(DEVICE)
    inputs = golden['input'].to(DEVICE)

    model.train()
    out = model(inputs)
    assert relative_error(out, golden['out_train']) <= OUTPUT_TOL
    (out * golden['loss_weight'].to(DEVICE)).sum().backward()
    params = dict(model.named_parameters())
    with_grad = {name for name, p in params.items() if p.grad is not None}
    assert with_grad == set(golden['grads'])
    for name, reference in golden['grads'].items():
        assert relative_error(params[name].grad, reference) <= GRAD_TOL, name
    state = model.state_dict()
    for name, reference in golden['buffers_after_train'].items():
        assert relative_error(state[name].float(), reference.float()) <= OUTPUT_TOL, name

    model.eval()
    with torch.no_grad():
        assert relative_error(model(inputs), golden['out_eval']) <= OUTPUT_TOL


def manifest_model(path):
    """The registered name and keyword arguments a manifest file describes."""
    stem = path.stem
    if stem.startswith('imagenet_'):
        return stem[len('imagenet_'):], {}
    dataset, _, time_steps = re.fullmatch(r'(.+?)_(released|4-384)_T(\d+)', stem).groups()
    return 'sglformer_' + dataset.replace('-', ''), {'T': int(time_steps)}


def read_manifest(path):
    lines = path.read_text().splitlines()
    count = int(lines[0].split('\t')[1])
    entries = []
    for line in lines[1:]:
        key, shape, dtype = line.split('\t')
        entries.append((key, () if shape == 'scalar' else tuple(int(s) for s in shape.split('x')), dtype))
    return count, entries


@pytest.mark.parametrize('path', shared_files('manifests', '*.tsv'))
def test_manifest(path):
    name, kwargs = manifest_model(path)
    count, entries = read_manifest(path)
    with torch.device('meta'):
        model = timm.create_model(name, **kwargs)
    ours = [(k, tuple(v.shape), str(v.dtype).removeprefix('torch.')) for k, v in model.state_dict().items()]
    # Same keys in the same order: optimiser states refer to parameters by position.
    assert ours == entries
    assert sglformer.count_parameters(model) == count


@pytest.mark.parametrize('name, kwargs, input_shape, classes', [
    ('sglformer_cifar10', dict(embed_dims=48, num_heads=4, T=2), (2, 3, 32, 32), 10),
    ('sglformer_cifar100', dict(embed_dims=48, num_heads=4, T=2), (2, 3, 32, 32), 100),
    ('sglformer_cifar10dvs', dict(embed_dims=48, num_heads=4, T=3, img_size_h=64, img_size_w=64), (2, 3, 2, 64, 64), 10),
    ('sglformer_dvs128gesture', dict(embed_dims=48, num_heads=4, T=2, img_size_h=64, img_size_w=96), (1, 2, 2, 64, 96), 11),
    ('sglformer_ima_8_384', dict(embed_dims=48, num_heads=4, depths=3, T=2), (2, 3, 64, 64), 1000),
    ('sglformer_ima2_8_384', dict(embed_dims=48, num_heads=4, depths=2, T=1, num_classes=5), (2, 3, 32, 32), 5),
])
def test_output_shapes(name, kwargs, input_shape, classes):
    model = timm.create_model(name, **kwargs).eval()
    with torch.no_grad():
        assert model(torch.rand(input_shape)).shape == (input_shape[0], classes)


def test_forward_resets_neurons():
    """Running a batch twice gives the same output without any reset_net call in between."""
    model = timm.create_model('sglformer_cifar10', embed_dims=48, num_heads=4, T=2).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        first = model(x)
        model(torch.rand(2, 3, 32, 32) * 5)
        assert torch.equal(model(x), first)


def test_reset_net_still_works():
    from spikingjelly.activation_based import functional
    model = timm.create_model('sglformer_cifar10', embed_dims=48, num_heads=4, T=2).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        first = model(x)
        functional.reset_net(model)
        assert torch.equal(model(x), first)


def test_ima2_first_neuron_carries_over_the_batch():
    """The T*B quirk: an image's output depends on the images before it in the batch."""
    model = timm.create_model('sglformer_ima2_8_384', embed_dims=48, num_heads=4, depths=2, T=2).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            torch.nn.init.constant_(module.weight, 4.0)  # make the tokenizer fire
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        together = model(x)
        alone = model(x[2:])
    assert not torch.allclose(together[2:], alone)


def test_unused_layernorms_are_frozen():
    model = timm.create_model('sglformer_ima_8_384', embed_dims=48, num_heads=4, depths=3, T=1)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {f'blocks.0.{n}.{w}' for n in ('norm1', 'norm2') for w in ('weight', 'bias')}


def test_authors_unused_and_timm_keywords_are_accepted():
    model = timm.create_model('sglformer_cifar10', embed_dims=48, num_heads=4, qkv_bias=False, qk_scale=None,
                              drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.1, sr_ratios=1,
                              norm_layer=torch.nn.LayerNorm, patch_size=4)
    assert model.num_classes == 10


def test_unknown_keyword_is_an_error():
    with pytest.raises(TypeError, match='embed_dim'):
        timm.create_model('sglformer_cifar10', embed_dim=48)


def test_pretrained_explains_how_to_load_weights():
    with pytest.raises(ValueError, match='load_checkpoint'):
        timm.create_model('sglformer_cifar10', pretrained=True)


def test_odd_token_grid_is_a_clear_error():
    model = timm.create_model('sglformer_dvs128gesture', embed_dims=48, num_heads=4, T=2, img_size_h=32, img_size_w=48)
    with pytest.raises(ValueError, match='multiples of 2'):
        model(torch.rand(1, 2, 2, 32, 48))


def test_heads_must_divide_dim():
    with pytest.raises(ValueError, match='divisible'):
        timm.create_model('sglformer_cifar10', embed_dims=48, num_heads=5)


def test_parameter_table():
    from sglformer.params import parameter_rows
    rows = {(r['variant'], r['T']): r for r in parameter_rows()}
    assert rows['sglformer_cifar10', 4]['params'] == 8_852_874
    assert rows['sglformer_cifar10dvs', 10]['params'] == 4_066_130
    assert rows['sglformer_ima_8_768', 4]['params'] == 64_024_648
    assert rows['sglformer_dvs128gesture', 16]['paper_params'] == '2.17M'
    assert len(rows) == 12


def test_parameter_command_matches_the_docs_and_the_readme(capsys):
    """docs/architecture.md shows the command's output verbatim; the README's results table has the same counts."""
    from conftest import REPO_ROOT
    from sglformer.params import main, parameter_rows
    main([])
    table = capsys.readouterr().out.strip()
    assert table in (REPO_ROOT / 'docs' / 'architecture.md').read_text()
    readme = (REPO_ROOT / 'README.md').read_text()
    for row in parameter_rows():
        if row['paper_model'] != '-':
            assert f"(`{row['variant']}`) | {row['T']} | {row['paper_params']} | {row['params']:,} |" in readme
