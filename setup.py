"""Build script: the package is pure Python until the kernels land (see csrc/)."""
from setuptools import setup

setup()
