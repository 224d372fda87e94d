"""The Triton kernels, installed as `ttt_e2e.kernels` (setup.py), one folder per op.

From the repository root (where `python train.py`, `python -m ttt_e2e.convert` and pytest run) this folder is also
reachable as a top-level module named `kernels`, the name of Hugging Face's `kernels` package, which transformers
probes for and imports. Imported under that name, it steps aside: the module put in sys.modules is the installed
package of that name found anywhere else on sys.path, or, where none is installed, an empty module without a file
or a version, which transformers' probe (`is_kernels_available`) takes for an absent package. Under its own name,
`ttt_e2e.kernels`, this does nothing.
"""
if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys
    import types

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is None:
        _module = types.ModuleType("kernels", "Hugging Face's kernels package is not installed")
        _module.__spec__, _module.__file__ = importlib.machinery.ModuleSpec("kernels", None), None
    else:
        _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds after this file ran
    if _spec is not None:
        _spec.loader.exec_module(_module)
