"""Converters from real data shipped in PyPI packages to the .npz import format.

See examples/README.md; each is a CLI: python -m examples.<name> --out=X.npz
"""
