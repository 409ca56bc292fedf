"""The cifar10-dvs folder, installed as a subpackage of sglformer.variants (see pyproject.toml)."""
