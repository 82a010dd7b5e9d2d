"""When an in-step load may land layer by layer: what vLLM's per-layer hooks guarantee.

vLLM calls the connector's ``wait_for_layer_load(layer_name)`` before each
attention layer's kernel, in the forward pass, but only where that forward
runs Python per layer: eager and piecewise CUDA graphs. A step that vLLM
replays as one full CUDA graph calls no hook, and a model may have attention
layers whose kernels never pass through the hook. A layer-wise load is only
correct if every layer it fills is waited for by its attention, so kvbm uses
it only where that is known:

* per step, the connector tells :meth:`LayerHooks.begin_step` whether this
  step's forward runs the hooks (:func:`hooks_run`: not for a full CUDA
  graph); otherwise the forward waits for whole loads;
* per run, the hooks are learned first: the first steps with a forward pass
  use whole loads and record which layers' hooks ran, in which order; only
  if every registered layer was waited for (its own cache, no KV shared
  between layers) do later steps land layer by layer, layers issued in the
  learned order. A later layer-wise step whose forward skipped a layer's hook
  (the hooks changed after they were learned) switches layer-wise loads off
  for good, with a warning, and :meth:`LayerHooks.end_step` says so: that
  step's loads count as failed (vLLM discards what it computed on them and
  recomputes; the stores of the step are dropped).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["LayerHooks", "hooks_run"]


class LayerHooks:
    """Decides, step by step, whether in-step loads land layer by layer.

    ``layers``: the layout's layer names (index = layer index in the layout);
    ``registered``: every name vLLM registered a KV cache under; ``enabled``:
    the setting (``layerwise_loads``) resolved for this device.
    """

    def __init__(self, layers: Sequence[str], registered: Iterable[str], enabled: bool) -> None:
        self._index = {name: i for i, name in enumerate(layers)}
        shared = set(registered) != set(layers)  # layers sharing one cache: whole loads
        if enabled and shared:
            logger.info("kvbm: layers share KV caches; in-step loads land whole, not layer by layer")
        self.enabled = enabled and not shared
        self.order: list[int] | None = None  # learned: layer indices in the order their hooks run
        self._in_step = False
        self._seen: list[str] = []

    @property
    def armed(self) -> bool:
        return self.enabled and self.order is not None

    def begin_step(self, hooks_run: bool) -> list[int] | None:
        """A step starts; ``hooks_run``: its forward pass calls the per-layer hooks. Returns the
        layer order to land this step's in-step loads in, or None (whole loads)."""
        self._in_step, self._seen = hooks_run, []
        return self.order if hooks_run and self.armed else None

    def hooked(self, name: str) -> int | None:
        """vLLM is about to run layer ``name``'s attention: its layer index (None: unknown)."""
        if self._in_step:
            self._seen.append(name)
        return self._index.get(name)

    def end_step(self, layered: bool) -> bool:
        """The step's forward pass is over: learn (or check) which layers' hooks ran. ``layered``:
        this step's loads landed layer by layer. True: they did, but some layer's attention ran
        without waiting for them. (vLLM may start a step without in-step loads after its forward
        pass: such a step records no hook, which is no evidence either way.)"""
        in_step, self._in_step = self._in_step, False
        if not (in_step and self.enabled):
            return False
        if layered and not self._seen:
            self._seen = [""]  # not a single hook ran: every layer was missed
        elif not self._seen:
            return False
        seen = set(self._seen)
        missing = [name for name in self._index if name not in seen]
        if self.order is None:
            if missing or not seen <= set(self._index):
                self.enabled = False
                logger.info("kvbm: vLLM ran no wait_for_layer_load for %d of %d KV layers (e.g. %s); in-step "
                            "loads land whole", len(missing), len(self._index), (missing or sorted(seen))[:3])
                return False
            self.order = [self._index[name] for name in dict.fromkeys(self._seen)]
            logger.info("kvbm: in-step loads land layer by layer (%d layers)", len(self.order))
        elif layered and missing:
            self.enabled = False
            logger.warning("kvbm: a forward pass skipped wait_for_layer_load for %s; this step's loads are "
                           "recomputed, and in-step loads land whole from now on", missing[:3])
            return True
        return False


def hooks_run(forward_context: Any) -> bool:
    """Does this step's forward pass call the per-layer hooks? Not when vLLM replays it as one
    full CUDA graph: its V2 GPU model runner (0.26-0.33) then starts the loads in a forward
    context without attention metadata, the V1 runner in one whose runtime mode is FULL (vLLM's
    hook wrapper skips the hooks without attention metadata too)."""
    mode = getattr(forward_context, "cudagraph_runtime_mode", None)
    return bool(getattr(forward_context, "attn_metadata", None)) and getattr(mode, "name", "NONE") != "FULL"
