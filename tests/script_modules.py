"""The repository's ``scripts/*.py`` as modules, for the tests of their parts."""
import importlib.util
import os
from types import ModuleType

FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts")


def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` imported as the module ``name`` (a fresh import each call)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(FOLDER, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
