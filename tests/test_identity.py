"""Block identity without an engine: the weights fingerprint, the model identity's factors, LoRA keys.

The end-to-end proofs (a re-pointed LoRA name misses, restarts with other
weights/overrides do not reuse G3) run real vLLM in tests/test_vllm_identity.py.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from kvbm.runtime.fingerprint import TENSORS_PER_FILE, fingerprint
from kvbm.vllm_integration.sizing import model_identity, storage_key


def write_model(path: Path, seed: int = 0, tensors: int = 4, extra_config: dict | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    save_file({f"layer{i}.weight": torch.randn(64, 64, generator=gen) for i in range(tensors)},
              str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"hidden_size": 64, **(extra_config or {})}))
    (path / "tokenizer.json").write_text("{}")
    return path


# ---- fingerprint -------------------------------------------------------------------------
def test_fingerprint_is_stable_across_copies_and_sees_new_weights(tmp_path):
    original = write_model(tmp_path / "a", seed=0)
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)  # new inodes and mtimes, same bytes
    assert fingerprint(str(original)) == fingerprint(str(copy)) is not None
    retrained = write_model(tmp_path / "b", seed=1)  # same header (names, shapes, offsets), other values
    assert fingerprint(str(retrained)) != fingerprint(str(original))
    write_model(original, seed=1)  # new weights written over the same path
    assert fingerprint(str(original)) == fingerprint(str(retrained))


def test_fingerprint_sees_config_changes_but_not_the_tokenizer(tmp_path):
    model = write_model(tmp_path / "m")
    before = fingerprint(str(model))
    (model / "tokenizer.json").write_text('{"other": 1}')
    assert fingerprint(str(model)) == before  # token ids are what blocks are keyed on
    (model / "config.json").write_text(json.dumps({"hidden_size": 64, "rope_theta": 5.0}))
    assert fingerprint(str(model)) != before


def test_fingerprint_samples_one_changed_tensor(tmp_path):
    model = write_model(tmp_path / "m", tensors=8)
    before = fingerprint(str(model))
    from safetensors.torch import load_file

    tensors = load_file(str(model / "model.safetensors"))
    tensors["layer5.weight"] = tensors["layer5.weight"] + 0.01  # a fine-tune of one layer
    save_file(tensors, str(model / "model.safetensors"))
    assert fingerprint(str(model)) != before


def test_fingerprint_reads_a_bounded_sample_of_large_files(tmp_path, monkeypatch):
    model = write_model(tmp_path / "m", tensors=TENSORS_PER_FILE * 4)
    reads: list[int] = []
    real_pread = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, off: reads.append(n) or real_pread(fd, n, off))
    assert fingerprint(str(model))
    assert len(reads) <= TENSORS_PER_FILE + 2  # the header, and one sample per chosen tensor
    assert sum(reads) < (model / "model.safetensors").stat().st_size // 20


def test_fingerprint_of_other_formats_and_of_nothing(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(os.urandom(1 << 20))
    first = fingerprint(str(gguf))
    assert fingerprint(str(gguf)) == first
    gguf.write_bytes(os.urandom(1 << 20))  # other weights, same size
    assert first and fingerprint(str(gguf)) != first
    assert fingerprint(str(tmp_path / "missing")) is None
    assert fingerprint("Qwen/Qwen3-0.6B") is None
    empty = tmp_path / "no-weights"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    assert fingerprint(str(empty)) is None
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(b"\xff" * 64)  # header length beyond the file: sampled as opaque
    assert fingerprint(str(bad))


# ---- model identity ----------------------------------------------------------------------
def vllm_config(model: str, **changes):
    values = {"model": model, "revision": None, "code_revision": None, "hf_config_path": None, "model_weights": "",
              "dtype": torch.bfloat16, "quantization": None, "quantization_config": None, "hf_overrides": {},
              "model_impl": "auto", "disable_sliding_window": False, "seed": 0, "tokenizer": model}
    values.update(changes)
    return SimpleNamespace(
        model_config=SimpleNamespace(**values),
        cache_config=SimpleNamespace(cache_dtype="auto", block_size=16, kv_cache_dtype_skip_layers=[]),
        parallel_config=SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1,
                                        decode_context_parallel_size=1),
        load_config=SimpleNamespace(load_format="auto", download_dir=None),
    )


KV = SimpleNamespace(kv_cache_tensors=[SimpleNamespace(size=1 << 20)], num_blocks=64, kv_cache_layout="NHD")


@pytest.mark.parametrize("change", [
    {"quantization": "fp8"},
    {"quantization_config": {"linear": {"method": "fp8"}}},
    {"hf_overrides": {"rms_norm_eps": 1e-5}},
    {"revision": "abc123"},
    {"code_revision": "def456"},
    {"model_impl": "transformers"},
    {"disable_sliding_window": True},
])
def test_every_factor_changes_the_identity(tmp_path, change):
    model = str(write_model(tmp_path / "m"))
    base = model_identity(vllm_config(model), KV, fingerprint_weights=True)
    assert model_identity(vllm_config(model), KV, fingerprint_weights=True) == base  # deterministic
    changed = vllm_config(model, **change)
    assert model_identity(changed, KV, fingerprint_weights=True) != base
    assert storage_key(changed, KV) == storage_key(vllm_config(model), KV)  # same files, journal restarts


def test_new_weights_change_the_identity_only_when_persisting(tmp_path):
    model = write_model(tmp_path / "m")
    cfg = vllm_config(str(model))
    before = model_identity(cfg, KV, fingerprint_weights=True)
    plain = model_identity(cfg, KV, fingerprint_weights=False)
    write_model(model, seed=7)
    assert model_identity(cfg, KV, fingerprint_weights=True) != before
    assert model_identity(cfg, KV, fingerprint_weights=False) == plain  # no file is read then


def test_tokenizer_does_not_change_the_identity(tmp_path):
    model = str(write_model(tmp_path / "m"))
    assert (model_identity(vllm_config(model), KV, fingerprint_weights=True)
            == model_identity(vllm_config(model, tokenizer="other/tokenizer"), KV, fingerprint_weights=True))


def test_unreadable_weights_are_never_reused_across_restarts(caplog):
    cfg = vllm_config("s3://bucket/model")
    first = model_identity(cfg, KV, fingerprint_weights=True)
    assert model_identity(cfg, KV, fingerprint_weights=True) != first
    assert "cannot read the weights" in caplog.text


def test_callable_overrides_have_a_stable_identity(tmp_path):
    def override(config):
        return config

    model = str(write_model(tmp_path / "m"))
    a = model_identity(vllm_config(model, hf_overrides=override), KV, fingerprint_weights=False)
    assert a == model_identity(vllm_config(model, hf_overrides=override), KV, fingerprint_weights=False)
    assert "test_identity" in a and "0x" not in a


# ---- LoRA keys -----------------------------------------------------------------------------
def lora_key(leader, name: str, lora_id: int, path: str, load_inplace: bool = False) -> str:
    from vllm.lora.request import LoRARequest

    from kvbm.vllm_integration.leader import KvbmLeader

    return KvbmLeader._lora_key(leader, LoRARequest(name, lora_id, path, load_inplace=load_inplace))


def fake_leader(persist: bool):
    from collections import OrderedDict

    return SimpleNamespace(config=SimpleNamespace(blocks_outlive_process=persist), _lora_keys=OrderedDict())


def test_lora_key_covers_name_id_and_path(tmp_path):
    a, b = str(write_model(tmp_path / "a")), str(write_model(tmp_path / "b", seed=1))
    leader = fake_leader(persist=False)
    key = lora_key(leader, "ad", 1, a)
    assert lora_key(leader, "ad", 1, a) == key
    assert len({key, lora_key(leader, "ad", 1, b), lora_key(leader, "ad", 2, a), lora_key(leader, "other", 1, a)}) == 4


def test_lora_key_follows_the_adapter_files_when_persisting_or_reloading(tmp_path):
    path = str(write_model(tmp_path / "a"))
    persisting, plain = fake_leader(persist=True), fake_leader(persist=False)
    before, plain_before = lora_key(persisting, "ad", 1, path), lora_key(plain, "ad", 1, path)
    write_model(tmp_path / "a", seed=3)  # the adapter retrained in place (a restart, or load_inplace)
    assert lora_key(fake_leader(persist=True), "ad", 1, path) != before  # after a restart
    assert lora_key(plain, "ad", 1, path) == plain_before  # vLLM keeps the loaded adapter: same KV
    assert lora_key(plain, "ad", 1, path, load_inplace=True) != plain_before  # reloaded: new weights
