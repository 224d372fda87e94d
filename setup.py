# The Triton kernels live in the top-level folder `kernels/` (one folder per op), but a top-level module of that
# name would shadow the Hugging Face `kernels` package that `transformers` probes for, so the folder is installed
# as the subpackage `ttt_e2e.kernels`. Everything else is declared in pyproject.toml.
from setuptools import find_packages, setup

packages = ["ttt_e2e", *(f"ttt_e2e.{p}" for p in find_packages("ttt_e2e"))]
packages += ["ttt_e2e.kernels", *(f"ttt_e2e.kernels.{p}" for p in find_packages("kernels"))]

setup(packages=packages, package_dir={"ttt_e2e": "ttt_e2e", "ttt_e2e.kernels": "kernels"})
