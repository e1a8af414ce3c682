"""Method discovery: the ``kdbench.methods`` entry-point group, plus plugin files.

kdbench's own methods are declared in its pyproject exactly as a third-party package declares its
own::

    [project.entry-points."kdbench.methods"]
    my_kd = "my_package.my_kd:MyKD"

A class that breaks the contract, or a name taken twice, is refused at load with a message that
names it and where it came from.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import re
import sys
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from .errors import KdbenchError
from .method import Method
from .values import like

ENTRY_POINT_GROUP = "kdbench.methods"


class PluginError(KdbenchError):
    """A method plugin that cannot be used (contract broken, duplicate name, import failure)."""


def validate(cls: Any, origin: str) -> type[Method]:
    """Check that ``cls`` honours the method contract; return it or raise ``PluginError``."""
    where = f"method plugin {origin}"
    if not (inspect.isclass(cls) and issubclass(cls, Method)):
        raise PluginError(f"{where}: {cls!r} is not a subclass of kdbench.method.Method")
    if not isinstance(cls.name, str) or not cls.name.isidentifier():
        raise PluginError(f"{where}: class attribute `name` must be a Python identifier, got {cls.name!r}")
    if not isinstance(cls.paper, str) or not cls.paper.strip():
        raise PluginError(f"{where}: class {cls.__name__} must name its paper in the class attribute `paper`")
    if cls.forward is Method.forward:
        raise PluginError(f"{where}: class {cls.__name__} does not implement forward(student, teachers, batch)")
    if not (isinstance(cls.min_teachers, int) and isinstance(cls.max_teachers, int)
            and 0 <= cls.min_teachers <= cls.max_teachers):
        raise PluginError(f"{where}: need 0 <= min_teachers <= max_teachers, got "
                          f"{cls.min_teachers} and {cls.max_teachers}")
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    for p in params:
        if p.kind is not inspect.Parameter.KEYWORD_ONLY or p.default is inspect.Parameter.empty:
            raise PluginError(
                f"{where}: __init__ argument '{p.name}' of {cls.__name__} must be keyword-only with a "
                f"default (write `def __init__(self, *, {p.name}: float = ...)`)")
    if "ce_weight" not in cls.hyperparameters():
        raise PluginError(f"{where}: {cls.__name__}.__init__ must take `ce_weight` (the weight of the "
                          "engine's cross-entropy term) and pass it to super().__init__")
    try:
        instance = cls()
    except Exception as exc:  # noqa: BLE001 - any failure here is the plugin's, reported as such
        raise PluginError(f"{where}: {cls.__name__}() with default hyperparameters failed: {exc}") from exc
    missing = [k for k in cls.hyperparameters() if not hasattr(instance, k)]
    if missing:
        raise PluginError(f"{where}: {cls.__name__} must store each hyperparameter as an attribute of "
                          f"the same name (missing: {', '.join(missing)}), so runs record their config")
    return cls


def _register(found: dict[str, tuple[type[Method], str]], cls: type[Method], origin: str, key: str) -> None:
    if key != cls.name:
        raise PluginError(f"method plugin {origin}: registered as '{key}' but the class says "
                          f"name = '{cls.name}'; make them equal")
    if key in found:
        raise PluginError(f"duplicate method name '{key}': {origin} and {found[key][1]} both define it; "
                          "rename one of them")
    found[key] = (cls, origin)


def load_plugin_file(path: str | Path) -> list[type[Method]]:
    """Import a plugin file and return the Method subclasses it defines."""
    path = Path(path)
    if not path.is_file():
        raise PluginError(f"plugin file '{path}' not found; pass the path of a .py file that defines a "
                          "kdbench.method.Method subclass")
    module_name = f"kdbench_plugin_{path.stem}_{abs(hash(str(path.resolve()))):x}"
    spec = importlib.util.spec_from_file_location(module_name, path) if path.suffix == ".py" else None
    if spec is None or spec.loader is None:
        raise PluginError(f"plugin file '{path}' is not a Python file (its name does not end in .py); pass the "
                          ".py file that defines the kdbench.method.Method subclass, or rename it to end in .py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except SystemExit as exc:  # sys.exit() in the file would end kdbench silently, with its own exit code
        raise PluginError(f"plugin file '{path}' called sys.exit({exc.code!r}) while being imported; a plugin "
                          "file may only define its Method classes: put script code under "
                          "`if __name__ == \"__main__\":`") from None
    except Exception as exc:  # noqa: BLE001 - a broken plugin is the user's to fix; say where
        raise PluginError(f"plugin file '{path}' failed to import: {type(exc).__name__}: {exc}") from exc
    classes = [c for c in vars(module).values()
               if inspect.isclass(c) and issubclass(c, Method) and c.__module__ == module_name]
    if not classes:
        raise PluginError(f"plugin file '{path}' defines no subclass of kdbench.method.Method")
    return classes


#: The distribution (name, version) each entry-point method came from, for :func:`method_source`.
_DISTRIBUTIONS: dict[type, tuple[str, str]] = {}


def method_source(cls: type[Method]) -> str:
    """A fingerprint of the code a method runs: part of every run's id and row (``method_source``).

    ``sha256:<hash> <file>`` of the file that defines the class (a plugin file or a built-in
    method); for a method installed by another distribution, ``<dist>==<version>`` before it (and
    the version alone when the source file cannot be read). Editing a method's file changes its
    fingerprint, so the next sweep runs it again instead of skipping it as done.
    """
    dist, version = _DISTRIBUTIONS.get(cls, ("", ""))
    parts = [f"{dist}=={version}"] if dist and dist != "kdbench" else []
    # The class's own file, then the files of the methods it inherits from (crd_kd runs crd.py's code too).
    files: list[Path] = []
    for base in cls.__mro__:
        if not (isinstance(base, type) and issubclass(base, Method)) or base is Method:
            continue
        try:
            path = Path(inspect.getsourcefile(base) or "")
        except TypeError:  # built in memory
            continue
        if path not in files:
            files.append(path)
    for path in files:
        try:
            parts.append(f"sha256:{hashlib.sha256(path.read_bytes()).hexdigest()[:16]} {path.name}")
        except OSError:  # a class defined in a file that is gone
            pass
    return " ".join(parts) or f"unknown ({cls.__module__}.{cls.__qualname__})"


def load_methods(plugin_files: Iterable[str | Path] = ()) -> dict[str, type[Method]]:
    """All methods: entry points of every installed distribution, then the given plugin files."""
    found: dict[str, tuple[type[Method], str]] = {}
    for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        dist = getattr(ep.dist, "name", "?")
        version = getattr(ep.dist, "version", "?")
        origin = f"'{ep.name}' (entry point {ep.value} of {dist})"
        try:
            cls = ep.load()
        except Exception as exc:  # noqa: BLE001
            raise PluginError(f"method plugin {origin} failed to import: {type(exc).__name__}: {exc}") from exc
        # The same distribution can be seen twice (e.g. an editable install plus a build dir).
        if ep.name in found and found[ep.name][0] is cls:
            continue
        _DISTRIBUTIONS[cls] = (dist, version)
        _register(found, validate(cls, origin), origin, ep.name)
    for path in plugin_files:
        for cls in load_plugin_file(path):
            origin = f"'{cls.name}' (class {cls.__name__} in {path})"
            _register(found, validate(cls, origin), origin, cls.name)
    if not found:
        raise PluginError(f"no methods found in the '{ENTRY_POINT_GROUP}' entry-point group; is kdbench "
                          "installed (pip install -e .)?")
    return {k: v[0] for k, v in sorted(found.items())}


# -- hyperparameters ---------------------------------------------------------------------------
def build_method(cls: type[Method], overrides: Mapping[str, Any] | None = None) -> Method:
    """Instantiate a method; a value it cannot take becomes a clear user error."""
    overrides = dict(overrides or {})
    defaults = cls.hyperparameters()
    try:
        for k, v in overrides.items():
            if k in defaults:  # an unknown name is the constructor's TypeError below
                overrides[k] = like(v, defaults[k], k)
        return cls(**overrides)
    except (ValueError, TypeError) as exc:
        given = ", ".join(f"{cls.name}.{k}={v!r}" for k, v in overrides.items())
        # The hyperparameter the message names, as a whole word ("weight" is not the one in "ce_weight must be ...").
        hp = next((k for k in sorted(overrides, key=len, reverse=True) if re.search(rf"\b{re.escape(k)}\b", str(exc))),
                  "NAME")
        raise KdbenchError(f"bad hyperparameter value for method '{cls.name}' ({given}): {exc}. Change it where it "
                           f"is set (--set {cls.name}.{hp}=VALUE, or the suite file's [hparams.{cls.name}]); "
                           "`kdbench list methods` shows the defaults") from None
