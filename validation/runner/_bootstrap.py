"""Make ``plansim.validation.runner`` importable when a runner file is run as a script from a
checkout that was never installed (the device machines run the repository as it is): the
repository's folders are mounted as the ``plansim`` package without importing
``validation/__init__`` and what it needs."""
import os as _os
import sys as _sys
import types as _types

try:
    import plansim.validation.runner  # noqa: F401  installed
except ImportError:
    _root = _os.path.dirname(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))
    _pkg = _types.ModuleType("plansim")
    _pkg.__path__ = [_os.path.join(_root, "plansim"), _root]
    _sys.modules["plansim"] = _pkg
    _val = _types.ModuleType("plansim.validation")  # skip validation/__init__ (may need more deps)
    _val.__path__ = [_os.path.join(_root, "validation")]
    _sys.modules["plansim.validation"] = _val
    _pkg.validation = _val
