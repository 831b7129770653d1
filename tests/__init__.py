"""The test suite is a package, so that ``tests.tiny_detectors`` is always this folder's module.

torch-fidelity (a test-only reference) installs a top-level ``tests`` package into
site-packages, which wins over a folder without ``__init__.py`` (a namespace package).
"""
