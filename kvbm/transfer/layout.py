"""How one KV block is laid out in vLLM's per-layer cache tensors.

vLLM hands ``register_kv_caches`` one tensor per layer whose shape depends on
the attention backend: CPU ``[B, H, N, 2*D]``, FlashAttention ``[2, B, N, H, D]``,
FlashInfer ``[B, 2, N, H, D]``, MLA ``[B, N, D]``. Instead of hard-coding
those, we find the block dimension (the one whose extent is the engine's
block count, or a multiple of it when kernel blocks are smaller than
scheduler blocks) and view every layer as bytes ``[outer, num_blocks, inner]``.
A block of a layer is then ``outer`` runs of ``inner`` bytes, one of which
starts at ``base + o*outer_stride + block*block_stride``. The CPU copy engine
and the CUDA kernels both work from this one description.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import torch


class LayoutError(ValueError):
    """A KV cache tensor cannot be described as paged blocks."""


@dataclass(frozen=True)
class LayerLayout:
    name: str
    outer: int  # runs per block (2 for FlashAttention's separate K and V planes)
    inner_bytes: int  # bytes per run
    offset: int  # where this layer's bytes start inside a host block
    #: The tensor's dims, outermost first in memory, as "shape@dim" words: two runs whose
    #: blocks hold the same bytes in another order must never share a persisted G3 file.
    physical: str = ""

    @property
    def block_bytes(self) -> int:
        return self.outer * self.inner_bytes


@dataclass(frozen=True)
class KVLayout:
    num_blocks: int
    layers: tuple[LayerLayout, ...]

    @property
    def block_bytes(self) -> int:
        """Bytes of one block across all layers of this worker (one host slot)."""
        return sum(layer.block_bytes for layer in self.layers)

    def signature(self) -> str:
        """The bytes of a slot, layer by layer, independent of the GPU pool's size: two servers
        whose signatures differ must never read each other's persisted blocks."""
        runs: list[list] = []  # consecutive identical layers once, with a count: bounded size
        for layer in self.layers:
            part = f"{layer.outer}x{layer.inner_bytes} {layer.physical}"
            if runs and runs[-1][0] == part:
                runs[-1][1] += 1
            else:
                runs.append([part, 1])
        return ";".join(f"{count}*[{part}]" for part, count in runs)

    def describe(self) -> str:
        first = self.layers[0]
        return (
            f"{len(self.layers)} layers x {first.outer} run(s) x {first.inner_bytes} B "
            f"= {self.block_bytes} B per block, {self.num_blocks} GPU blocks, physical order {first.physical}"
        )


def find_block_dim(shape: tuple[int, ...], num_blocks: int) -> tuple[int, int]:
    """Return (dim, kernel blocks per block). Prefers the leading dims, where
    every known backend puts the block dimension."""
    for dim, extent in enumerate(shape):
        if extent == num_blocks:
            return dim, 1
    for dim, extent in enumerate(shape):
        if num_blocks and extent % num_blocks == 0 and extent > num_blocks:
            return dim, extent // num_blocks
    raise LayoutError(
        f"no dimension of a KV cache tensor of shape {tuple(shape)} has {num_blocks} "
        "blocks; kvbm does not support this attention backend's layout"
    )


def as_block_view(tensor: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """View a layer's cache as uint8 ``[outer, num_blocks, inner_bytes]`` (no copy).

    Works in the tensor's *physical* order, not its logical shape: vLLM's GPU
    model runner (0.26+) hands FlashAttention caches that are logically
    ``[B, H, N, 2D]`` but stored block-outermost with tokens before heads
    (strides ``(H*N*2D, 2D, H*2D, 1)``). What matters for copying is only that
    the storage is dense and where the block dimension falls in it: dims with a
    larger stride are ``outer`` runs, dims with a smaller one are ``inner``
    bytes. A host slot keeps the block's bytes in that physical order, so a
    load writes back exactly what a store read.
    """
    dim, per_block = find_block_dim(tuple(tensor.shape), num_blocks)
    order = sorted(range(tensor.dim()), key=lambda d: (-tensor.stride(d), d))  # physical order
    physical = tensor.permute(order)
    if not physical.is_contiguous():
        raise LayoutError(
            f"KV cache tensor of shape {tuple(tensor.shape)} and strides {tensor.stride()} "
            "has gaps between its elements; kvbm needs each layer's cache in one dense buffer"
        )
    at = order.index(dim)
    outer = prod(physical.shape[:at])
    inner = prod(physical.shape[at + 1 :]) * per_block * tensor.element_size()
    flat = physical.reshape(-1).view(torch.uint8)  # dense in this order: a view, never a copy
    return flat.view(outer, num_blocks, inner)


def _dense(tensor: torch.Tensor) -> bool:
    order = sorted(range(tensor.dim()), key=lambda d: (-tensor.stride(d), d))
    return tensor.permute(order).is_contiguous()


def _pages(states: list[torch.Tensor] | tuple[torch.Tensor, ...], num_blocks: int) -> torch.Tensor:
    """The whole pages behind a Mamba layer's state views (vLLM on GPUs registers such a layer
    as a list: conv state, SSM state, each ``[num_blocks, ...]`` over one page per block).

    A page holds the states at its start and padding after them; kvbm moves whole pages, as
    it does for a Mamba layer that shares its buffer with an attention layer."""
    first = states[0]
    if not isinstance(first, torch.Tensor) or first.dim() < 1 or first.shape[0] != num_blocks:
        raise LayoutError(f"a KV cache entry of {len(states)} tensors whose first is not [num_blocks, ...]; "
                          "kvbm does not know this layout")
    page = first.stride(0) * first.element_size()
    start = first.storage_offset() * first.element_size()
    storage = first.untyped_storage()
    if storage.nbytes() < start + num_blocks * page:
        raise LayoutError(f"a KV cache entry's pages ({num_blocks} x {page} B) run past its buffer")
    return torch.empty(0, dtype=torch.uint8, device=first.device).set_(storage, start, (num_blocks, page))


def describe_kv_caches(
    kv_caches: dict[str, torch.Tensor | list[torch.Tensor]], num_blocks: int
) -> tuple[KVLayout, list[torch.Tensor]]:
    """Layout plus the per-layer byte views, in a stable (sorted) layer order."""
    layers: list[LayerLayout] = []
    views: list[torch.Tensor] = []
    seen: set[int] = set()
    offset = 0

    def dense(value: torch.Tensor | list[torch.Tensor]) -> bool:
        return isinstance(value, torch.Tensor) and _dense(value)

    for name in sorted(kv_caches, key=lambda n: (not dense(kv_caches[n]), n)):
        value = kv_caches[name]
        # Layers sharing one buffer (KV sharing; under vLLM's hybrid manager a layer of every
        # group) are stored once, through a dense view of it if one of them is (a Mamba layer's
        # view covers only its state at the start of each page).
        key = (value if isinstance(value, torch.Tensor) else value[0]).data_ptr()
        if key in seen:
            continue
        seen.add(key)
        tensor = value if isinstance(value, torch.Tensor) else _pages(value, num_blocks)
        view = as_block_view(tensor, num_blocks)
        outer, _, inner = view.shape
        order = sorted(range(tensor.dim()), key=lambda d: (-tensor.stride(d), d))
        block_dim, _ = find_block_dim(tuple(tensor.shape), num_blocks)
        physical = " ".join("B" if d == block_dim else f"{tensor.shape[d]}@{d}" for d in order)
        physical += " " + str(tensor.dtype).replace("torch.", "")
        layers.append(LayerLayout(name=name, outer=outer, inner_bytes=inner, offset=offset, physical=physical))
        views.append(view)
        offset += outer * inner
    if not layers:
        raise LayoutError("vLLM registered no KV cache tensors")
    return KVLayout(num_blocks=num_blocks, layers=tuple(layers)), views
