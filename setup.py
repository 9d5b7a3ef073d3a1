"""Build script. Placeholder until the compiled extension lands: installs the pure-PyTorch package."""
from setuptools import setup

setup()
