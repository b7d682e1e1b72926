"""Your own model: `model.name: "package.module:ClassName"` or `"path/to/file.py:ClassName"`.

Importing a module runs its code, so it happens only with the user's permission on the command
line (`--trust-code`): never because a config or a checkpoint names it. A file reference is
recorded with its absolute path, so eval and predict find it from any directory.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path

from torch import nn

from trainkit.errors import ConfigError


def is_code_reference(name: str) -> bool:
    return ":" in name


def _split(name: str) -> tuple[str, str]:
    where, _, attribute = name.rpartition(":")
    if not where or not attribute.isidentifier():
        raise ConfigError(
            "model.name", f"'{name}': expected 'package.module:ClassName' or 'path/to/file.py:ClassName'"
        )
    return where, attribute


def _is_file(where: str) -> bool:
    return where.endswith(".py") or "/" in where or os.sep in where


def canonical_name(name: str) -> str:
    """A file reference with its absolute path; a module reference as given."""
    where, attribute = _split(name)
    return f"{Path(where).resolve()}:{attribute}" if _is_file(where) else name


def untrusted_message(name: str) -> str:
    where, attribute = _split(name)
    what = f"file {where}" if _is_file(where) else f"module {where}"
    return f"'{name}' is code ({attribute} from {what}); trainkit imports it only when you add --trust-code"


def import_model_class(name: str, trust_code: bool) -> type[nn.Module]:
    """The nn.Module subclass a reference names, imported only when `trust_code`."""
    where, attribute = _split(name)
    if not trust_code:
        raise ConfigError("model.name", untrusted_message(name))
    try:
        module = _import_file(Path(where)) if _is_file(where) else _import_module(where)
    except ConfigError:
        raise
    except Exception as error:  # the user's module failed while importing: say where
        first = (str(error).strip().splitlines() or [""])[0]
        raise ConfigError(
            "model.name", f"importing {where} failed: {type(error).__name__}: {first}"
        ) from error
    cls = getattr(module, attribute, None)
    if cls is None:
        raise ConfigError("model.name", f"{where} has no attribute '{attribute}'")
    if not (inspect.isclass(cls) and issubclass(cls, nn.Module)):
        raise ConfigError("model.name", f"{name} is not an nn.Module subclass (a {type(cls).__name__})")
    return cls


def _import_module(module_name: str):
    # The working directory is importable, as with `python -m` (a console script lacks it).
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and module_name.startswith(error.name):
            raise ConfigError("model.name", f"no module named '{module_name}'") from error
        raise
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _import_file(path: Path):
    path = path.resolve()
    if not path.is_file():
        raise ConfigError("model.name", f"file not found: {path}")
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
    module_name = f"trainkit_user_model_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ConfigError("model.name", f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module


def accepted_arguments(cls: type) -> tuple[list[str], bool]:
    """(named parameters of the constructor, whether it takes **kwargs)."""
    params = inspect.signature(cls).parameters
    names = [p.name for p in params.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return names, any(p.kind == p.VAR_KEYWORD for p in params.values())
