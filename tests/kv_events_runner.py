"""Real vLLM with kvbm and KV events on: collect what vLLM's publisher sends. Usage: kv_events_runner.py SPEC OUT

SPEC: {"model", "endpoint" (ipc://...), "prompts" (token id lists), "kvbm" (bool)}. OUT: the events, in order,
as [kind, medium, block_hashes (hex), parent (hex or null), token count] lists.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from kvbm.platform import prepare_cpu_process  # noqa: E402

prepare_cpu_process()


def _hex(h) -> str | None:
    if h is None:
        return None
    return h.hex() if isinstance(h, bytes) else format(h, "x")


def main() -> None:
    import msgspec
    import zmq
    from vllm import LLM, SamplingParams
    from vllm.config import KVEventsConfig, KVTransferConfig
    from vllm.distributed.kv_events import KVEventBatch

    spec = json.loads(open(sys.argv[1]).read())
    events: list[list] = []
    stop = threading.Event()
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(spec["endpoint"])
    decoder = msgspec.msgpack.Decoder(type=KVEventBatch)

    def listen() -> None:
        while not stop.is_set():
            if sub.poll(100):
                frames = sub.recv_multipart()
                batch = decoder.decode(frames[-1])
                for e in batch.events:
                    kind = type(e).__name__
                    events.append([kind, getattr(e, "medium", None), [_hex(h) for h in getattr(e, "block_hashes", [])],
                                   _hex(getattr(e, "parent_block_hash", None)), len(getattr(e, "token_ids", []) or [])])

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    transfer = None
    if spec["kvbm"]:
        transfer = KVTransferConfig(kv_connector="DynamoConnector", kv_role="kv_both",
                                    kv_connector_module_path="kvbm.vllm_integration.connector",
                                    kv_connector_extra_config={"DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": 64})
    llm = LLM(model=spec["model"], block_size=128, max_model_len=2048, enforce_eager=True, seed=0,
              num_gpu_blocks_override=spec.get("gpu_blocks", 17), kv_transfer_config=transfer,
              kv_events_config=KVEventsConfig(enable_kv_cache_events=True, publisher="zmq",
                                              endpoint=spec["endpoint"]))
    time.sleep(1.0)  # the subscriber joins before the first event
    params = SamplingParams(max_tokens=2, temperature=0.0)
    for prompt in spec["prompts"]:
        llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    # An idle offline engine steps only inside generate: one more request reports and publishes the last stores.
    llm.generate([{"prompt_token_ids": [5, 6, 7]}], params, use_tqdm=False)
    time.sleep(1.5)
    stop.set()
    thread.join()
    with open(sys.argv[2], "w") as out:
        json.dump(events, out)


if __name__ == "__main__":
    main()
