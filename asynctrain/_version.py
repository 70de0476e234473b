"""The package version, in one place: ``asynctrain.__version__``, the checkpoints'
``asynctrain_version`` and ``pyproject.toml`` (``[tool.setuptools.dynamic]``) read it."""

__version__ = "0.1.0"
