# `make test` and `make demo` set everything up on a fresh machine. `make test` builds two virtual
# environments, one per supported spikingjelly stack, and runs the whole suite in each:
#   .venv      requirements.txt       (the reference stack, spikingjelly 0.0.0.0.14)
#   .venv-sj2  requirements-sj2.txt   (spikingjelly 2.x)
# `make test-ref` / `make test-sj2` run one of them; `make demo` uses .venv; `make gpu-wheels` prepares
# bench/gpu.sh for a GPU machine without network (docs/performance.md).
PYTHON ?= python3
PYTEST_ARGS ?= -q

.PHONY: test test-ref test-sj2 demo install clean gpu-wheels

test: test-ref test-sj2

install: .venv/.installed

.venv/.installed: requirements.txt requirements-common.txt pyproject.toml
.venv-sj2/.installed: requirements-sj2.txt requirements-common.txt pyproject.toml

%/.installed:
	test -x $*/bin/python || $(PYTHON) -m venv $*
	$*/bin/python -m pip install --quiet -r $(if $(findstring sj2,$*),requirements-sj2.txt,requirements.txt)
	$*/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

test-ref: .venv/.installed
	.venv/bin/python -m pytest $(PYTEST_ARGS)

test-sj2: .venv-sj2/.installed
	.venv-sj2/bin/python -m pytest $(PYTEST_ARGS)

demo: .venv/.installed
	.venv/bin/python -m sglformer.demo

# The spikingjelly wheels bench/gpu.sh installs on a GPU machine without network (Python 3.12, x86-64).
gpu-wheels:
	mkdir -p .whl
	for wheel in spikingjelly==0.0.0.0.14 'spikingjelly>=2,<3' loguru; do \
	    $(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	        --platform manylinux2014_x86_64 --platform any -d .whl "$$wheel" || exit 1; \
	done

clean:
	rm -rf .venv .venv-sj2 .pytest_cache
