"""The README and docs/: short, self-contained, every link and every reference from the code resolving,
every option and every state-dict name documented; and the package's functions short enough to read."""
import ast
import re
import shlex

import pytest
import timm
import torch

from conftest import FOLDER_MODELS, REPO_ROOT
from sglformer import bench, energy
from sglformer.config import check, parse_args
from sglformer.options import OPTIONS
from sglformer.data import dataset_family
from sglformer.neuron import KNOWN_BACKENDS, NEURON_BACKENDS, STACK, spikingjelly_memopt

DOCS = sorted((REPO_ROOT / 'docs').glob('*.md'))
PAGES = [REPO_ROOT / 'README.md', *DOCS]
LINK = re.compile(r'\[[^\]]*\]\(([^)\s]+)\)')
DOC_REFERENCE = re.compile(r'\bdocs/([\w-]+\.md)(#[\w-]+)?')
INTERNAL_NOTES = re.compile(r'SPEC\.md|RECIPES\.md|DESIGN\.md|STYLE\.md|\.\./shared|golden/')


def anchors(page):
    """GitHub's anchors of a page's headings."""
    return {re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')
            for heading in re.findall(r'^#+ (.*)$', page.read_text(), re.M)}


def test_readme_is_short():
    assert (REPO_ROOT / 'README.md').stat().st_size <= 10 * 1024


@pytest.mark.parametrize('page', PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    for target in LINK.findall(page.read_text()):
        if re.match(r'[a-z]+:', target):
            continue  # a web address
        path, _, anchor = target.partition('#')
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.exists(), f'{page.name}: {target}'
        if anchor and resolved.suffix == '.md':
            assert anchor in anchors(resolved), f'{page.name}: {target}'


def test_every_docs_reference_in_the_code_resolves():
    sources = [*(REPO_ROOT / 'sglformer').rglob('*.py'), REPO_ROOT / 'Makefile', *(REPO_ROOT / 'bench').iterdir(),
               *(path for folder in FOLDER_MODELS for path in (REPO_ROOT / folder).iterdir())]
    found = 0
    for source in sources:
        for name, anchor in DOC_REFERENCE.findall(source.read_text()):
            found += 1
            assert (REPO_ROOT / 'docs' / name).is_file(), f'{source}: docs/{name}'
            if anchor:
                assert anchor[1:] in anchors(REPO_ROOT / 'docs' / name), f'{source}: docs/{name}{anchor}'
    assert found


def test_nothing_points_at_internal_notes():
    files = [*PAGES, *(REPO_ROOT / 'sglformer').rglob('*.py'), *(REPO_ROOT / 'bench').iterdir(),
             *(path for folder in FOLDER_MODELS for path in (REPO_ROOT / folder).iterdir())]
    offenders = [str(f.relative_to(REPO_ROOT)) for f in files if INTERNAL_NOTES.search(f.read_text())]
    assert not offenders


def test_every_option_is_documented():
    text = (REPO_ROOT / 'docs' / 'configuration.md').read_text()
    assert [o.name for o in OPTIONS if f'`{o.name}`' not in text] == []


def test_every_state_dict_name_is_documented(registered_variants):
    """Each dotted part of every state-dict key of every registered variant appears on the architecture
    page (in backticks), so that a reader can place any key of a checkpoint."""
    text = (REPO_ROOT / 'docs' / 'architecture.md').read_text()
    documented = set(re.findall(r'`([^`]+)`', text))
    documented |= {part for entry in documented for part in re.split(r'[.\s(),]+', entry)}
    missing = set()
    for name in registered_variants:
        with torch.device('meta'):
            keys = timm.create_model(name).state_dict()
        missing |= {part for key in keys for part in key.split('.') if not part.isdigit() and part not in documented}
    assert not missing, sorted(missing)


def documented_commands():
    """``(page, words)`` of every python/torchrun command line in the README's and docs' bash blocks."""
    commands = []
    for page in PAGES:
        for block in re.findall(r'```bash\n(.*?)```', page.read_text(), re.S):
            for line in block.replace('\\\n', ' ').splitlines():
                line = line.split(' #')[0].strip()
                if re.search(r'(^|&& )(python|torchrun)\b', line):
                    commands.append(pytest.param(page.name, shlex.split(line), id=f'{page.name}:{line[:60]}'))
    return commands


def script_and_arguments(words):
    """``(folder or module, arguments)`` of a documented command."""
    if '-m' in words and words[words.index('-m') + 1].startswith('sglformer.'):
        index = words.index('-m') + 1
        return words[index], words[index + 1:]
    folder = words[1] if words[0] == 'cd' else None
    index = next(i for i, word in enumerate(words) if word.endswith('train.py'))
    return folder or words[index].split('/')[0], words[index + 1:]


@pytest.mark.parametrize('page, words', documented_commands())
def test_every_documented_command_parses_and_passes_its_checks(page, words):
    script, arguments = script_and_arguments(words)
    missing = [name for name in KNOWN_BACKENDS if name not in NEURON_BACKENDS]
    missing += ['memopt'] if spikingjelly_memopt() is None else []
    other_stack = [name for name in missing if any(name in word for word in arguments)]
    if other_stack and script == 'sglformer.bench':
        pytest.skip(f'{other_stack[0]} is for the other spikingjelly stack than {STACK}')
    if script == 'sglformer.energy':
        energy.parse_args(arguments)
    elif script == 'sglformer.bench':
        bench.parse_args(arguments)
    elif script in ('sglformer.params', 'sglformer.demo'):
        assert not arguments
    else:
        options = parse_args(arguments, REPO_ROOT / script / f'{script}.yml', defaults={'model': FOLDER_MODELS[script]})
        check(options, 'eval' if options.eval else 'train', dataset_family(options.dataset))


def test_the_cheap_documented_commands_run(capsys):
    readme = (REPO_ROOT / 'README.md').read_text()
    small = next(line for line in readme.splitlines() if 'sglformer.energy --model sglformer_cifar10 --dim 48' in line)
    energy.main(shlex.split(small)[3:])
    assert 'Energy per image' in capsys.readouterr().out


def test_no_function_of_the_package_is_longer_than_60_lines():
    long = []
    for path in (REPO_ROOT / 'sglformer').rglob('*.py'):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f'{path.name}:{node.name}')
    assert not long


def test_no_module_of_the_package_is_longer_than_450_lines():
    assert [p.name for p in (REPO_ROOT / 'sglformer').rglob('*.py') if len(p.read_text().splitlines()) > 450] == []


def package_imports(path):
    """The top-level modules of the package that the file ``path`` of it imports."""
    here = path.relative_to(REPO_ROOT / 'sglformer').parts[:-1]  # the file's package, as a path from sglformer
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            target = here[:len(here) - node.level + 1] + tuple((node.module or '').split('.'))
            names = [target[0]] if target and target[0] else [alias.name for alias in node.names]
            found.update(name for name in names if name)
    return found


def test_the_map_of_where_things_live_is_the_code():
    table = (REPO_ROOT / 'docs' / 'architecture.md').read_text().split('## Where things live')[1].split('\n## ')[0]
    allowed = {}
    for row in re.findall(r'^\| `(\w+)` \|.*\| ([\w, -]+) \|$', table, re.M):
        allowed[row[0]] = {name.strip() for name in row[1].split(',') if name.strip() != '-'}
    modules = {p.relative_to(REPO_ROOT / 'sglformer').parts[0].removesuffix('.py'): p
               for p in sorted((REPO_ROOT / 'sglformer').rglob('*.py')) if p.name != '__init__.py' or p.parent.name != 'sglformer'}
    assert sorted(allowed) == sorted(modules)  # every module in the map, and nothing else
    for name in modules:
        files = (REPO_ROOT / 'sglformer').glob(f'{name}/**/*.py') if (REPO_ROOT / 'sglformer' / name).is_dir() else [
            REPO_ROOT / 'sglformer' / f'{name}.py']
        imported = set().union(*(package_imports(path) for path in files)) - {name}
        assert imported <= allowed[name], (name, sorted(imported - allowed[name]))
