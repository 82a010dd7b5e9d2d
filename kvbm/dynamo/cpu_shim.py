"""Lets ``dynamo.vllm`` import on a CPU-only torch, without torchvision.

Why this exists: Dynamo 1.6's vLLM worker imports
``transformers.models.qwen2_vl.image_processing_qwen2_vl`` at start-up (for one
pure-arithmetic helper, ``smart_resize``, used only for Qwen-VL images), and in
transformers 5 that module does ``from torchvision.transforms.v2 import
functional`` unconditionally. On PyPI, torchvision for x86_64 Linux is a CUDA
build: next to ``torch==2.13.0+cpu`` it fails to import (``operator
torchvision::nms does not exist``) and breaks ``import transformers`` itself, so
the project's environments uninstall it (see scripts/setup.sh) and text models
never need it. No CPU build of torchvision 0.28 (the one that matches torch 2.13)
exists on PyPI.

What it does: a ``sys.meta_path`` finder that, *only* for that one module and
*only* while torchvision is not installed, executes the real transformers file
with empty placeholder modules standing in for ``torchvision`` during that
import, and removes them right after. Nothing else ever sees a torchvision: the
availability checks of transformers and vLLM still say "not installed", and a
placeholder attribute used by mistake (an image request to a Qwen-VL model)
raises an ImportError naming the fix. No installed file is edited.

It is activated by a ``.pth`` line that scripts/setup_dynamo.sh writes into the
Dynamo environment (``import kvbm.dynamo.cpu_shim as s; s.install()``), so the
seed's commands (``python -m dynamo.vllm ...``) work unchanged. When a real
torchvision is importable the finder steps aside.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from typing import Any

#: The one module the finder serves.
TARGET = "transformers.models.qwen2_vl.image_processing_qwen2_vl"
_PLACEHOLDERS = ("torchvision", "torchvision.transforms", "torchvision.transforms.v2",
                 "torchvision.transforms.v2.functional")
_FIX = ("torchvision is not installed in this CPU environment (kvbm.dynamo.cpu_shim stood in for it while "
        "Dynamo imported a Qwen-VL helper); image inputs need a torchvision build that matches torch")


class _Placeholder(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise ImportError(f"{self.__name__}.{name}: {_FIX}")


class _Loader(importlib.abc.Loader):
    def __init__(self, real: importlib.abc.Loader) -> None:
        self._real = real

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self._real.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        added: dict[str, types.ModuleType] = {}
        for name in _PLACEHOLDERS:
            if name not in sys.modules:
                added[name] = sys.modules[name] = _Placeholder(name)
        for name, placeholder in added.items():  # parent.child attributes, as an import would set
            parent, _, child = name.rpartition(".")
            if parent in added:
                setattr(added[parent], child, placeholder)
        try:
            self._real.exec_module(module)
        finally:
            for name, placeholder in added.items():
                if sys.modules.get(name) is placeholder:
                    del sys.modules[name]


class TorchvisionShimFinder(importlib.abc.MetaPathFinder):
    """Serves :data:`TARGET` with torchvision placeholders while torchvision is missing."""

    def find_spec(self, fullname: str, path: Any, target: types.ModuleType | None = None
                  ) -> importlib.machinery.ModuleSpec | None:
        if fullname != TARGET or _torchvision_installed():
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _Loader(spec.loader)
        return spec


def _torchvision_installed() -> bool:
    if "torchvision" in sys.modules:
        return True
    try:
        return importlib.util.find_spec("torchvision") is not None
    except (ImportError, ValueError):
        return False


def install() -> None:
    """Add the finder once (idempotent; cheap: nothing is imported until TARGET is)."""
    if not any(isinstance(finder, TorchvisionShimFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, TorchvisionShimFinder())
