"""Run one real vLLM engine (in-process mode) through a list of phases; print JSON.

Tests start this in a subprocess, once with kvbm and once without, so both
sides of every comparison run in the same process mode with the same thread
settings, and one engine serves a whole test module. Phases:

* ``generate``: prompts (token ids), ``max_tokens``, optional ``salts``,
  optional ``loras`` (``[name, int id, path]`` or null per prompt),
  ``reset_prefix_cache`` before (drops vLLM's own G1 prefix cache).
* ``abort``: submit prompts, step the engine ``steps`` times, abort the
  ``abort`` indices, run the rest to completion.
* ``corrupt_host``: overwrite kvbm's host arena with noise (negative control).
* ``worker_arenas``: each worker process's used G2 rows (works with tensor parallel).
* ``barrier``: touch ``<dir>/<name>.reached`` and wait for ``<dir>/<name>.go`` (the test
  kills or restarts Redis meanwhile).
* ``wait_remote``: wait until the leader's and the worker's G4 stores are up again.

After each phase it records kvbm's planner stats and leak checks.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from kvbm.platform import prepare_cpu_process  # noqa: E402

prepare_cpu_process()


def _kvbm_state(llm) -> dict:
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    connector = scheduler.connector
    if connector is None or not hasattr(connector, "_leader"):
        return {"preemptions": getattr(scheduler, "_kvbm_test_preemptions", 0)}
    planner = connector._leader.runtime.inspect_planner()
    pools = [p for p in (planner.host, planner.disk) if p is not None]
    refs = sum(pool.refcount(s) for pool in pools for s in range(pool.num_slots))
    remote = connector._leader.runtime.remote
    remote_index = connector._leader.runtime.remote_index
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    runner = get_kv_transfer_group()._worker._runner if has_kv_transfer_group() else None  # in-process worker
    return {
        "layered_steps": getattr(runner, "layered_steps", 0),
        "stats": planner.stats.as_dict(),
        "tiers": {name: dict(vars(stats)) for name, stats in planner.stats.tiers.items()},
        "remote": None if remote is None else {k: v for k, v in remote.stats().items() if k != "latency"},
        "g4_lookups": None if remote_index is None else {"deferred": remote_index.deferred,
                                                         "gave_up": remote_index.gave_up},
        "pool_used": sum(pool.num_used for pool in pools),
        "pool_refs": refs,
        "evicted": sum(pool.stats.evicted for pool in pools),
        "host_used": planner.host.num_used if planner.host else 0,
        "disk_used": planner.disk.num_used if planner.disk else 0,
        "busy": planner.busy,
        "tracked_requests": planner.num_tracked_requests(),
        "vllm_requests": len(scheduler.requests),
        "preemptions": getattr(scheduler, "_kvbm_test_preemptions", 0),
    }


def _settle(llm, timeout: float = 60.0) -> None:
    """Step an idle engine until kvbm has no copies in flight.

    A server's engine loop keeps stepping while the connector has pending work;
    the offline ``LLM`` only steps inside ``generate``, so background disk
    writes would otherwise be reported during the next phase.
    """
    import time

    connector = llm.llm_engine.engine_core.engine_core.scheduler.connector
    deadline = time.monotonic() + timeout
    if not hasattr(connector, "_leader"):
        connector = None  # another connector: nothing of kvbm's to wait for
    while connector is not None and connector.has_pending_push_work() and time.monotonic() < deadline:
        llm.llm_engine.step()
        time.sleep(0.005)


def _count_preemptions(llm) -> None:
    """Count vLLM's preemptions so tests can prove a scenario really preempted."""
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    original = scheduler._preempt_request
    scheduler._kvbm_test_preemptions = 0

    def counting(*args, **kwargs):
        scheduler._kvbm_test_preemptions += 1
        return original(*args, **kwargs)

    scheduler._preempt_request = counting


def _generate(llm, phase: dict) -> dict:
    from vllm import SamplingParams

    if phase.get("reset_prefix_cache"):
        llm.reset_prefix_cache()
    sp = SamplingParams(temperature=0, max_tokens=phase.get("max_tokens", 16), ignore_eos=True)
    salts = phase.get("salts") or [None] * len(phase["prompts"])
    prompts = []
    for ids, salt in zip(phase["prompts"], salts):
        prompt = {"prompt_token_ids": ids}
        if salt is not None:
            prompt["cache_salt"] = salt
        prompts.append(prompt)
    loras = None
    if phase.get("loras"):
        from vllm.lora.request import LoRARequest

        loras = [LoRARequest(*lora) if lora else None for lora in phase["loras"]]
    results = llm.generate(prompts, sp, use_tqdm=False, lora_request=loras)
    outputs = [list(r.outputs[0].token_ids) for r in results]
    cached = [r.num_cached_tokens or 0 for r in results]
    return {"outputs": outputs, "cached": cached}


def _abort(llm, phase: dict) -> dict:
    from vllm import SamplingParams

    engine = llm.llm_engine
    sp = SamplingParams(temperature=0, max_tokens=phase.get("max_tokens", 16), ignore_eos=True)
    ids = [f"abort-{i}" for i in range(len(phase["prompts"]))]
    for req_id, tokens in zip(ids, phase["prompts"]):
        engine.add_request(req_id, {"prompt_token_ids": tokens}, sp)
    finished: dict[str, list[int]] = {}
    for _ in range(phase.get("steps", 1)):
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = list(out.outputs[0].token_ids)
    engine.abort_request([ids[i] for i in phase["abort"]])
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = list(out.outputs[0].token_ids)
    # A few idle steps let in-flight copies report back.
    for _ in range(3):
        engine.step()
    keep = [i for i in range(len(ids)) if i not in phase["abort"]]
    return {"outputs": [finished.get(ids[i]) for i in keep]}


def _corrupt_host(llm, phase: dict) -> dict:
    import torch
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    if not hasattr(llm.llm_engine.engine_core.engine_core.scheduler.connector, "_leader"):
        return {}  # the baseline has no kvbm host tier to corrupt
    arena = get_kv_transfer_group()._worker.runner.executor.host
    generator = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, arena.buffer.shape, dtype=torch.uint8, generator=generator)
    arena.buffer.copy_(noise)
    return {}


def _scramble_rank(worker) -> int:
    """Runs inside each vLLM worker process: noise into every byte of vLLM's own KV cache (every
    group's pages, Mamba states too). Returns the number of tensors written."""
    import torch

    seen: set[int] = set()

    def walk(x) -> int:
        if isinstance(x, (list, tuple)):
            return sum(walk(y) for y in x)
        if isinstance(x, dict):
            return sum(walk(y) for y in x.values())
        if not isinstance(x, torch.Tensor) or x.data_ptr() in seen:
            return 0
        seen.add(x.data_ptr())
        if x.is_floating_point():
            x.normal_(0.0, 0.5)
        else:
            x.random_(0, 127)
        return 1

    runner = getattr(worker, "model_runner", None) or worker.worker.model_runner  # a wrapper on some releases
    return walk(runner.kv_caches)


def _scramble_device_cache(llm, phase: dict) -> dict:
    """Forget vLLM's prefix cache and fill its KV cache with noise: a hit that a later phase serves
    must then come from where it claims (kvbm's tiers, landed before any use), never from bytes
    an earlier identical run left in the same block."""
    llm.reset_prefix_cache()
    return {"scrambled_tensors": llm.collective_rpc(_scramble_rank)}


def _worker_disk(llm):
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    if llm.llm_engine.engine_core.engine_core.scheduler.connector is None:
        return None
    return get_kv_transfer_group()._worker.runner.executor.media["G3"].arena


def _damage_disk(llm, phase: dict) -> dict:
    """Real damage to the real G3 file: flip a byte in every used slot, or truncate it."""
    disk = _worker_disk(llm)
    if disk is None:
        return {}
    pool = llm.llm_engine.engine_core.engine_core.scheduler.connector._leader.runtime.inspect_planner().disk
    slots = [s for s in range(pool.num_slots) if pool.state(s).name == "READY"]
    if phase["how"] == "flip":
        with open(disk.path, "r+b") as f:
            for slot in slots:
                f.seek(slot * disk.slot_size + disk.slot_size // 2)  # inside the payload
                byte = f.read(1)
                f.seek(-1, 1)
                f.write(bytes([byte[0] ^ 0xFF]))
    elif phase["how"] == "truncate":
        os.truncate(disk.path, 4096)
    return {"damaged_slots": len(slots)}


def _arena_summary(worker) -> dict:
    """Runs inside each vLLM worker process (collective_rpc): this rank's G2 rows in use."""
    import hashlib

    import torch
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    rows = get_kv_transfer_group()._worker.runner.executor.host.buffer
    used = [i for i in range(rows.shape[0]) if bool(rows[i].any())]
    return {
        "rank": torch.distributed.get_rank() if torch.distributed.is_initialized() else 0,
        "used_rows": used,
        "digest": hashlib.blake2b(rows[used].numpy().tobytes(), digest_size=8).hexdigest(),
    }


def _worker_arenas(llm, phase: dict) -> dict:
    """Per rank, which G2 rows hold data (tensor parallel: every rank stores its own heads)."""
    if llm.llm_engine.engine_core.engine_core.scheduler.connector is None:
        return {}
    return {"ranks": llm.collective_rpc(_arena_summary)}


def _barrier(llm, phase: dict) -> dict:
    import time
    from pathlib import Path

    base = Path(phase["dir"]) / phase["name"]
    base.with_suffix(".reached").touch()
    deadline = time.monotonic() + phase.get("timeout", 300)
    while not base.with_suffix(".go").exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"barrier {phase['name']}: the test never said go")
        time.sleep(0.05)
    return {}


def _wait_remote(llm, phase: dict) -> dict:
    """Until G4 is back on the leader and the worker (their probers reconnect on their own)."""
    import time

    from vllm.distributed.kv_transfer import get_kv_transfer_group

    leader = llm.llm_engine.engine_core.engine_core.scheduler.connector._leader.runtime.remote
    worker = get_kv_transfer_group()._worker.runner.executor.media["G4"].store
    start = time.monotonic()
    while not (leader.is_up and worker.is_up) and time.monotonic() - start < phase.get("timeout", 90):
        time.sleep(0.05)
    return {"up": leader.is_up and worker.is_up, "waited_s": time.monotonic() - start}


def _engine_info(llm, phase: dict) -> dict:
    """What vLLM made of the model: its KV-cache groups, whether its hybrid manager is on, its pool."""
    core = llm.llm_engine.engine_core.engine_core
    config = core.scheduler.kv_cache_config
    return {
        "hybrid_manager": not core.vllm_config.scheduler_config.disable_hybrid_kv_cache_manager,
        "groups": [type(g.kv_cache_spec).__name__ for g in config.kv_cache_groups],
        "num_blocks": config.num_blocks,
    }


PHASES = {
    "generate": _generate, "abort": _abort, "corrupt_host": _corrupt_host, "damage_disk": _damage_disk,
    "worker_arenas": _worker_arenas, "barrier": _barrier, "wait_remote": _wait_remote,
    "engine_info": _engine_info, "scramble_device_cache": _scramble_device_cache,
}


def main() -> None:
    spec = json.load(open(sys.argv[1]))
    from vllm import LLM

    engine_args = dict(spec["engine"])
    if spec.get("transfer") is not None:  # another connector, e.g. vLLM's own OffloadingConnector
        engine_args["kv_transfer_config"] = spec["transfer"]
    elif spec.get("kvbm") is not None:
        # Tests assert which tier served what: load whatever matched unless a test asks for
        # the cost rule (which may recompute a prefix that the measured rates say is faster).
        extra = {"onboard_policy": "always", **spec["kvbm"]}
        engine_args["kv_transfer_config"] = {
            "kv_connector": "DynamoConnector",
            "kv_role": "kv_both",
            "kv_connector_module_path": "kvbm.vllm_integration.connector",
            "kv_connector_extra_config": extra,
        }
    llm = LLM(**engine_args)
    _count_preemptions(llm)
    results = []
    for phase in spec["phases"]:
        result = PHASES[phase["type"]](llm, phase)
        _settle(llm)
        result["kvbm"] = _kvbm_state(llm)
        results.append(result)
    with open(sys.argv[2], "w") as out:
        json.dump(results, out)


if __name__ == "__main__":
    main()
