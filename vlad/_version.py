"""The package version, importable by any module without importing the public ``vlad`` namespace (which sits above
the library modules, see tests/unit/test_layers.py)."""

__version__ = "0.1.0"
