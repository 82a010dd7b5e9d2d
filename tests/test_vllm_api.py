"""kvbm's connector against every supported vLLM release's API, without installing them.

``tests/data/vllm_api/<version>.json`` records, per release, the connector base
class's methods and signatures and the scheduler-side fields kvbm reads
(``scripts/vllm_api_snapshot.py`` writes them from vLLM's source). Releases
that cannot run here (0.33 pins another torch; 0.26 needs a CUDA torch) are
checked this way, so an API drift fails CI instead of a user's server.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from kvbm.vllm_versions import version_problem

ROOT = Path(__file__).resolve().parent.parent
SNAPSHOTS = sorted((ROOT / "tests" / "data" / "vllm_api").glob("*.json"))
VERSIONS = [p.stem for p in SNAPSHOTS]

#: Hooks kvbm implements that only newer releases call (compat.py knows each).
#: ``SupportsHMA``'s method (not in the recorded base class): the same signature in every supported
#: release (checked against the installed 0.27.1 and 0.32.0; vLLM added the mixin before 0.26).
HMA_METHODS = {"request_finished_all_groups": ["self", "request", "block_ids"]}

NEWER_HOOKS = {
    "get_transfer_results": "0.30.0",
    "get_external_cache_hit_sources": "0.32.0",
    "requires_kv_delivery": "0.27.0",
}

#: What the leader reads from vLLM's scheduler objects (kvbm/vllm_integration/leader.py).
USED_FIELDS = {
    "SchedulerOutput": ["scheduled_new_reqs", "scheduled_cached_reqs", "num_scheduled_tokens",
                        "preempted_req_ids"],
    "NewRequestData": ["req_id", "block_ids", "num_computed_tokens"],
    "CachedRequestData": ["req_ids", "new_block_ids", "num_computed_tokens", "resumed_req_ids"],
    "KVConnectorOutput": ["finished_sending", "finished_recving", "kv_connector_worker_meta"],
    "KVTransferConfig": ["kv_connector_extra_config", "engine_id", "kv_load_failure_policy"],
    "Request": ["request_id", "all_token_ids", "cache_salt", "lora_request", "mm_features", "prompt_embeds"],
    # kv_cache_layout only since 0.29: compat.kv_cache_layout falls back to the backends' global setting.
    "KVCacheConfig": ["num_blocks", "kv_cache_tensors", "kv_cache_groups"],
}


def _connector_methods() -> dict[str, ast.FunctionDef]:
    """DynamoConnector's methods, read from its source (no vLLM import needed)."""
    source = (ROOT / "kvbm" / "vllm_integration" / "connector.py").read_text()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.name == "DynamoConnector":
            return {item.name: item for item in ast.walk(node) if isinstance(item, ast.FunctionDef)}
    raise AssertionError("DynamoConnector not found in connector.py")


def _api(version: str) -> dict:
    return json.loads((ROOT / "tests" / "data" / "vllm_api" / f"{version}.json").read_text())


def _names(cls: dict) -> set[str]:
    return set(cls["fields"]) | set(cls["methods"])


def test_snapshots_cover_the_supported_range():
    assert VERSIONS[0] == "0.26.0" and VERSIONS[-1].startswith("0.33.")
    assert all(version_problem(v) is None for v in VERSIONS)
    assert version_problem("0.25.1")[0] == "older"
    assert version_problem("0.34.0")[0] == "newer"
    assert version_problem("0.33.1.dev7+g1234.cpu") is None
    assert version_problem("0.32.0+cpu") is None


@pytest.mark.parametrize("version", VERSIONS)
def test_every_abstract_method_is_implemented(version):
    base = _api(version)["classes"]["KVConnectorBase_V1"]["methods"]
    abstract = {name for name, sig in base.items() if "abstractmethod" in sig["decorators"]}
    assert abstract, "snapshot lost the abstract methods"
    missing = abstract - set(_connector_methods())
    assert not missing, f"vLLM {version} requires {sorted(missing)} that DynamoConnector lacks"


@pytest.mark.parametrize("version", VERSIONS)
def test_overridden_methods_match_the_base_signature(version):
    base = _api(version)["classes"]["KVConnectorBase_V1"]["methods"]
    for name, node in _connector_methods().items():
        if name.startswith("_") and name != "__init__":
            continue
        if name in HMA_METHODS:
            assert [a.arg for a in node.args.args] == HMA_METHODS[name]
            continue
        if name not in base:
            since = NEWER_HOOKS.get(name)
            assert since is not None, f"DynamoConnector.{name} is not a vLLM {version} connector method"
            assert tuple(map(int, version.split("."))) < tuple(map(int, since.split("."))), (
                f"{name} should exist in vLLM {version} (listed as new in {since})")
            continue
        ours = [a.arg for a in node.args.posonlyargs + node.args.args]
        theirs = base[name]["params"]
        assert ours == theirs, f"vLLM {version} calls {name}{tuple(theirs)}; kvbm defines {name}{tuple(ours)}"
        if base[name]["kwonly"] or base[name]["varkw"]:
            assert node.args.kwarg is not None, f"{name} must accept vLLM {version}'s keyword arguments"


@pytest.mark.parametrize("version", VERSIONS)
def test_scheduler_fields_kvbm_reads_exist(version):
    classes = _api(version)["classes"]
    for cls, fields in USED_FIELDS.items():
        missing = set(fields) - _names(classes[cls])
        assert not missing, f"vLLM {version}'s {cls} has no {sorted(missing)}"
    # The features compat.py detects by name, as the snapshots see them.
    has_results = "KVConnectorTransferResults" in classes
    assert has_results == ("failed_recving" in classes["KVConnectorOutput"]["fields"])
    assert ("get_transfer_results" in classes["KVConnectorBase_V1"]["methods"]) == has_results


def test_installed_vllm_matches_its_snapshot():
    """compat's feature detection agrees with the recorded source of the installed release."""
    pytest.importorskip("vllm")
    from kvbm.vllm_integration.compat import features

    found = features()
    version = ".".join(found.version.split("+")[0].split(".")[:3])
    if version not in VERSIONS:
        pytest.skip(f"no snapshot for vLLM {found.version}")
    api = _api(version)
    assert (found.transfer_results is not None) == ("KVConnectorTransferResults" in api["classes"])
    assert (found.cache_hit_source is not None) == api["modules"]["v1/metrics/cache_hit_source.py"]
    assert found.output_has_failed_recving == ("failed_recving" in api["classes"]["KVConnectorOutput"]["fields"])
    assert found.has_load_failure_policy
