#!/usr/bin/env python3
"""Record the parts of a vLLM release's API that kvbm depends on, as JSON.

    python scripts/vllm_api_snapshot.py /path/to/vllm-0.33.0 > tests/data/vllm_api/0.33.0.json

The argument is an unpacked vLLM source tree (the sdist from PyPI, e.g.
``pip download --no-deps --no-binary :all: vllm==0.33.0`` or its ``.tar.gz``
from files.pythonhosted.org). Only names and signatures are recorded — parsed
with ``ast``, nothing imported — so ``tests/test_vllm_api.py`` can check
kvbm's connector against releases that cannot be installed here (0.33 pins a
torch this machine lacks). See docs/vllm-versions.md.
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

#: file (relative to the tree's vllm/) -> classes whose methods/fields kvbm uses
SOURCES = {
    "distributed/kv_transfer/kv_connector/v1/base.py": [
        "KVConnectorBase_V1", "KVConnectorMetadata", "KVConnectorWorkerMetadata", "KVConnectorTransferResults",
    ],
    "v1/core/sched/output.py": ["SchedulerOutput", "NewRequestData", "CachedRequestData"],
    "v1/outputs.py": ["KVConnectorOutput"],
    "config/kv_transfer.py": ["KVTransferConfig"],
    "v1/request.py": ["Request"],
    "v1/kv_cache_interface.py": ["KVCacheConfig"],
}
#: modules whose mere presence is a feature
MODULES = ["v1/metrics/cache_hit_source.py", "distributed/kv_transfer/kv_connector/v1/multi_connector.py"]


def _decorators(node: ast.FunctionDef) -> list[str]:
    return [ast.unparse(d) for d in node.decorator_list]


def _signature(node: ast.FunctionDef) -> dict:
    args = node.args
    return {
        "params": [a.arg for a in args.posonlyargs + args.args],
        "kwonly": [a.arg for a in args.kwonlyargs],
        "varargs": args.vararg is not None,
        "varkw": args.kwarg is not None,
        "decorators": _decorators(node),
    }


def _class(node: ast.ClassDef) -> dict:
    methods: dict[str, dict] = {}
    fields: list[str] = []
    for item in node.body:
        if isinstance(item, ast.FunctionDef):
            methods[item.name] = _signature(item)
            if item.name == "__init__":  # attributes set in the constructor (Request)
                for sub in ast.walk(item):
                    targets = sub.targets if isinstance(sub, ast.Assign) else (
                        [sub.target] if isinstance(sub, ast.AnnAssign) else [])
                    for t in targets:
                        if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                            fields.append(t.attr)
        elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            fields.append(item.target.id)
    return {"bases": [ast.unparse(b) for b in node.bases], "methods": methods, "fields": sorted(set(fields))}


def snapshot(tree: Path) -> dict:
    root = tree / "vllm"
    out: dict = {"classes": {}, "modules": {}}
    for rel, wanted in SOURCES.items():
        module = ast.parse((root / rel).read_text())
        for node in module.body:
            if isinstance(node, ast.ClassDef) and node.name in wanted:
                out["classes"][node.name] = _class(node)
    for rel in MODULES:
        out["modules"][rel] = (root / rel).exists()
    return out


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    json.dump(snapshot(Path(sys.argv[1])), sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
