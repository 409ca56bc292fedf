"""A plain install of a built wheel, used from a directory without a checkout, creates every variant and
loads every checkpoint container: what users who load released weights from their own code rely on."""
import shutil
import subprocess
import sys
import sysconfig
import textwrap

from conftest import REPO_ROOT
from sglformer.variants import DATASET_FOLDERS

# Runs in the fresh environment: every variant, every container (raw, timm's, the DVS and ImageNet scripts',
# with DDP's prefix), and each folder's YAML file from the installed package.
USE_THE_WHEEL = textwrap.dedent('''
    import argparse, importlib.resources, pathlib, sys
    import timm, torch
    import sglformer
    assert pathlib.Path(sglformer.__file__).parent.parent == pathlib.Path(sys.argv[1]), sglformer.__file__
    names = sglformer.load_variants()
    with torch.device('meta'):
        for name in names:
            timm.create_model(name)
    small = dict(embed_dims=48, num_heads=4, T=2)
    weights = timm.create_model('sglformer_cifar10', **small).state_dict()
    containers = {
        'raw': weights,
        'timm': {'epoch': 3, 'state_dict': weights, 'args': argparse.Namespace(model='sglformer'), 'metric': 1.0},
        'dvs': {'model': weights, 'epoch': 3, 'max_test_acc1': 1.0},
        'mae': {'model': {'module.' + k: v for k, v in weights.items()}, 'epoch': 3, 'scaler': {}},
    }
    for kind, container in containers.items():
        torch.save(container, kind + '.pth')
        model = timm.create_model('sglformer_cifar10', **small)
        sglformer.load_checkpoint(model, kind + '.pth')
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items()), kind
    for package in sys.argv[2:]:
        assert any(p.name.endswith('.yml') for p in importlib.resources.files(f'sglformer.variants.{package}').iterdir())
    print(len(names), 'variants')
''')


def test_a_wheel_installed_elsewhere_creates_every_variant_and_loads_every_container(tmp_path):
    source = tmp_path / 'source'  # a copy: building in place would leave build/ in the checkout
    source.mkdir()
    for name in ('pyproject.toml', 'README.md', 'LICENSE'):
        shutil.copy(REPO_ROOT / name, source / name)
    for folder in ('sglformer', *DATASET_FOLDERS):
        shutil.copytree(REPO_ROOT / folder, source / folder, ignore=shutil.ignore_patterns('__pycache__'))
    pip = [sys.executable, '-m', 'pip', '--disable-pip-version-check', '-q']
    subprocess.run([*pip, 'wheel', '--no-deps', '--no-build-isolation', '-w', str(tmp_path / 'dist'), str(source)],
                   check=True, cwd=tmp_path, timeout=300)
    wheel, = (tmp_path / 'dist').glob('sglformer-*.whl')

    # A fresh environment: this one's dependencies (a path, so that its own .pth files, the editable
    # install of the checkout among them, are not read), and the wheel installed into its site-packages.
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(tmp_path / 'fresh')], check=True, timeout=120)
    python = tmp_path / 'fresh' / 'bin' / 'python'
    site = subprocess.run([python, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'], check=True,
                          capture_output=True, text=True).stdout.strip()
    with open(f'{site}/dependencies.pth', 'w') as pth:
        pth.write(sysconfig.get_paths()['purelib'] + '\n')
    subprocess.run([*pip, 'install', '--no-deps', '--target', site, str(wheel)], check=True, timeout=300)

    work = tmp_path / 'elsewhere'
    work.mkdir()
    done = subprocess.run([python, '-c', USE_THE_WHEEL, site, *DATASET_FOLDERS.values()], cwd=work,
                          capture_output=True, text=True, timeout=300, env={'PATH': '/usr/bin:/bin'})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == '10 variants'
