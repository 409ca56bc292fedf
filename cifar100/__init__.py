"""The cifar100 folder, installed as a subpackage of sglformer.variants (see pyproject.toml)."""
