"""The dvs128-gesture folder, installed as a subpackage of sglformer.variants (see pyproject.toml)."""
