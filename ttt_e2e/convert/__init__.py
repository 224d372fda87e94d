"""Weights in and out of the authors' JAX reference: see __main__.py for the command line."""
from .layout import ConvertError
from .reference import from_jax, to_jax

__all__ = ["ConvertError", "from_jax", "to_jax"]
