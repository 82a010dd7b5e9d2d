"""The local model builder (kvbm.tools.demo.tiny_model): builds publish whole or not at all."""

from __future__ import annotations

import json
from pathlib import Path

from kvbm.tools.demo.tiny_model import _COMPLETE_MARKER, build_eagle_draft, build_model, model_dir_name


def test_a_leftover_incomplete_dir_is_replaced_and_a_second_call_reuses_the_build(tmp_path: Path) -> None:
    final = tmp_path / model_dir_name("test")
    final.mkdir()
    (final / "junk").write_text("not a model")  # what a crashed foreign writer could leave
    assert build_model(tmp_path, preset="test") == final
    stamp = (final / _COMPLETE_MARKER).stat().st_mtime_ns
    assert build_model(tmp_path, preset="test") == final
    assert (final / _COMPLETE_MARKER).stat().st_mtime_ns == stamp  # not rebuilt
    assert (final / _COMPLETE_MARKER).is_file() and not (final / "junk").exists()
    assert json.loads((final / "kvbm_preset.json").read_text())["preset"] == "test"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp or stale dirs left

    draft = build_eagle_draft(final)
    assert draft == final.with_name(final.name + "-eagle") and (draft / _COMPLETE_MARKER).is_file()
    assert json.loads((draft / "config.json").read_text())["num_hidden_layers"] == 1
    assert build_eagle_draft(final) == draft  # the second call reuses it
