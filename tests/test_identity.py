"""Block identity without an engine: the weights fingerprint, the model identity's factors, LoRA keys.

The end-to-end proofs (a re-pointed LoRA name misses, restarts with other
weights/overrides do not reuse G3) run real vLLM in tests/test_vllm_identity.py.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

import kvbm.runtime.fingerprint as fp
from kvbm.runtime.fingerprint import CACHE_NAME, fingerprint
from kvbm.runtime.identity import model_identity, storage_key


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


def test_fingerprint_sees_one_changed_tensor_among_many(tmp_path):
    """A partial fine-tune: one tensor of 300, one element of it (before: the fingerprint
    sampled 64 tensors' middles and this change went unseen)."""
    from safetensors.torch import load_file

    model = write_model(tmp_path / "m", tensors=300)
    before = fingerprint(str(model))
    tensors = load_file(str(model / "model.safetensors"))
    for name in ("layer7.weight", "layer150.weight", "layer299.weight"):
        changed = dict(tensors)
        changed[name] = tensors[name].clone()
        changed[name][0, 0] += 1.0
        save_file(changed, str(model / "model.safetensors"))
        assert fingerprint(str(model)) != before, name
    save_file(tensors, str(model / "model.safetensors"))  # the original bytes again
    assert fingerprint(str(model)) == before


def _counting_hashes(monkeypatch) -> list[str]:
    hashed: list[str] = []
    real = fp._hash_file
    monkeypatch.setattr(fp, "_hash_file", lambda path, threads: hashed.append(os.path.basename(path))
                        or real(path, threads))
    return hashed


def test_fingerprint_cache_skips_unchanged_files_and_sees_every_change(tmp_path, monkeypatch):
    monkeypatch.setattr(fp, "RACY_NS", 0)  # the files were written just now
    cache = tmp_path / "cache"
    model = write_model(tmp_path / "m", tensors=16)
    weights = model / "model.safetensors"
    hashed = _counting_hashes(monkeypatch)
    first = fingerprint(str(model), str(cache))
    assert sorted(hashed) == ["config.json", "model.safetensors"]
    assert (cache / CACHE_NAME).stat().st_mode & 0o777 == 0o600 and cache.stat().st_mode & 0o777 == 0o700
    hashed.clear()
    assert fingerprint(str(model), str(cache)) == first and hashed == []  # nothing read again
    time.sleep(0.05)  # past one timestamp tick: the change below gets a new ctime

    st = weights.stat()  # other bytes of the same size, mtime set back: the ctime still moves
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert weights.stat().st_size == st.st_size and weights.stat().st_mtime_ns == st.st_mtime_ns
    changed = fingerprint(str(model), str(cache))
    assert hashed == ["model.safetensors"] and changed != first
    hashed.clear()
    time.sleep(0.05)

    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # mtime only: hashed again, same bytes
    assert fingerprint(str(model), str(cache)) == changed and hashed == ["model.safetensors"]
    hashed.clear()
    time.sleep(0.05)

    with open(weights, "ab") as f:  # size
        f.write(b"\0")
    assert fingerprint(str(model), str(cache)) not in (first, changed) and hashed == ["model.safetensors"]
    hashed.clear()

    copy = tmp_path / "copy"  # same bytes elsewhere: hashed once (new inodes), same fingerprint
    shutil.copytree(model, copy)
    assert fingerprint(str(copy), str(cache)) == fingerprint(str(model), str(cache))
    assert sorted(hashed) == ["config.json", "model.safetensors"]


def test_digest_of_a_file_still_being_written_is_not_cached(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    model = write_model(tmp_path / "m")  # ctime: just now, within RACY_NS
    hashed = _counting_hashes(monkeypatch)
    first = fingerprint(str(model), str(cache))
    assert fingerprint(str(model), str(cache)) == first
    assert hashed.count("model.safetensors") == 2


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown a file to another user")
def test_a_foreign_or_linked_fingerprint_cache_is_never_trusted(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(fp, "RACY_NS", 0)
    model = write_model(tmp_path / "m")
    cache = tmp_path / "cache"
    truth = fingerprint(str(model), str(cache))
    time.sleep(0.05)
    entries = json.loads((cache / CACHE_NAME).read_text())
    write_model(model, seed=1)  # new weights; a forged cache entry claims the old digest for them
    real = str((model / "model.safetensors").resolve())
    entries["files"][real][:5] = fp._stat_key(os.stat(real))
    forged = json.dumps(entries)
    (cache / CACHE_NAME).write_text(forged)
    os.chown(cache / CACHE_NAME, 65534, 65534)
    hashed = _counting_hashes(monkeypatch)
    assert fingerprint(str(model), str(cache)) != truth and "model.safetensors" in hashed
    assert "belongs to uid 65534" in caplog.text
    (cache / CACHE_NAME).unlink()
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(forged)
    os.symlink(elsewhere, cache / CACHE_NAME)
    hashed.clear()
    assert fingerprint(str(model), str(cache)) != truth and "model.safetensors" in hashed
    assert "symbolic link" in caplog.text


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
    (bad / "model.safetensors").write_bytes(b"\xff" * 64)  # not a valid safetensors header: hashed like any file
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


KV = SimpleNamespace(kv_cache_tensors=[SimpleNamespace(size=1 << 20)], num_blocks=64)


def identity(cfg, **kwargs) -> str:
    """The leader's identity of ``cfg`` (slot shape included), as a vLLM of one version resolving layout NHD."""
    return model_identity(cfg, storage_key(cfg, KV, "NHD"), vllm_version="0.32.0", **kwargs)


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
    base = identity(vllm_config(model), fingerprint_weights=True)
    assert identity(vllm_config(model), fingerprint_weights=True) == base  # deterministic
    changed = vllm_config(model, **change)
    assert identity(changed, fingerprint_weights=True) != base
    same_files = storage_key(changed, KV, "NHD") == storage_key(vllm_config(model), KV, "NHD")
    assert same_files  # same files: the journal restarts them empty


def test_new_weights_change_the_identity_only_when_persisting(tmp_path):
    model = write_model(tmp_path / "m")
    cfg = vllm_config(str(model))
    before = identity(cfg, fingerprint_weights=True)
    plain = identity(cfg, fingerprint_weights=False)
    write_model(model, seed=7)
    assert identity(cfg, fingerprint_weights=True) != before
    assert identity(cfg, fingerprint_weights=False) == plain  # no file is read then


def test_tokenizer_does_not_change_the_identity(tmp_path):
    model = str(write_model(tmp_path / "m"))
    assert (identity(vllm_config(model), fingerprint_weights=True)
            == identity(vllm_config(model, tokenizer="other/tokenizer"), fingerprint_weights=True))


def test_unreadable_weights_are_never_reused_across_restarts(caplog):
    cfg = vllm_config("s3://bucket/model")
    first = identity(cfg, fingerprint_weights=True)
    assert identity(cfg, fingerprint_weights=True) != first
    assert "cannot read the weights" in caplog.text


def test_callable_overrides_have_a_stable_identity(tmp_path):
    def override(config):
        return config

    model = str(write_model(tmp_path / "m"))
    a = identity(vllm_config(model, hf_overrides=override), fingerprint_weights=False)
    assert a == identity(vllm_config(model, hf_overrides=override), fingerprint_weights=False)
    assert "test_identity" in a and "0x" not in a


# ---- LoRA keys -----------------------------------------------------------------------------
def lora_key(keys, name: str, lora_id: int, path: str, load_inplace: bool = False) -> str:
    return keys.key(name, lora_id, path, reload=load_inplace)


def fake_leader(persist: bool, cache_dir: str | None = None):
    from kvbm.runtime.lora import LoraKeys

    return LoraKeys(blocks_outlive_process=persist)


def test_lora_key_covers_name_id_and_path(tmp_path):
    a, b = str(write_model(tmp_path / "a")), str(write_model(tmp_path / "b", seed=1))
    leader = fake_leader(persist=False)
    key = lora_key(leader, "ad", 1, a)
    assert lora_key(leader, "ad", 1, a) == key
    assert len({key, lora_key(leader, "ad", 1, b), lora_key(leader, "ad", 2, a), lora_key(leader, "other", 1, a)}) == 4


def test_lora_key_follows_the_adapter_files_when_persisting_or_reloading(tmp_path):
    path = str(write_model(tmp_path / "a"))
    cache = str(tmp_path / "cache")
    persisting, plain = fake_leader(persist=True, cache_dir=cache), fake_leader(persist=False)
    before, plain_before = lora_key(persisting, "ad", 1, path), lora_key(plain, "ad", 1, path)
    write_model(tmp_path / "a", seed=3)  # the adapter retrained in place (a restart, or load_inplace)
    assert lora_key(fake_leader(persist=True, cache_dir=cache), "ad", 1, path) != before  # after a restart
    assert lora_key(plain, "ad", 1, path) == plain_before  # vLLM keeps the loaded adapter: same KV
    assert lora_key(plain, "ad", 1, path, load_inplace=True) != plain_before  # reloaded: new weights
