"""The copy kernels of :mod:`kvbm.transfer.cuda`: their source, and compilation on first use.

Kept apart from the engine because a kernel is a contract with the GPU, not with the engine's
bookkeeping: the Triton kernel (default) and its CUDA C twin (``backend="cupy"``) take the same
arguments (a device table of planes, block ids and host rows, one anchor pointer in the unified
virtual address space) and must stay interchangeable, which is easiest to keep true side by side.
Both copy a batch as work items ``(block i, plane s, chunk c)`` walked by a persistent grid; the
engine (:class:`kvbm.transfer.cuda.CudaCopyEngine`) builds the tables and launches them.

Nothing heavy is imported at module import: Triton and CuPy are imported, and the kernels
compiled, the first time :func:`triton_kernel` / :func:`cupy_kernel` is called (when an engine
is built and warms up), so this module imports on a machine without a GPU.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CUPY_THREADS", "NUM_WARPS", "cupy_kernel", "triton_kernel"]

NUM_WARPS = 4  # Triton: warps per program
CUPY_THREADS = 256  # CUDA C: threads per block (the kernel is compiled for exactly this many)

_TRITON_KERNEL: Any = None
_CUPY_KERNELS: dict[int, Any] = {}


def triton_kernel() -> Any:
    """The Triton gather/scatter kernel (compiled per direction and alignment on first launch)."""
    global _TRITON_KERNEL, tl
    if _TRITON_KERNEL is not None:
        return _TRITON_KERNEL
    import triton
    import triton.language as tl  # noqa: F811  (the kernel below reads ``tl`` from module globals)

    @triton.jit(do_not_specialize=["n", "host_base", "host_row", "num_segs", "chunks_per_seg"])
    def _kvbm_copy_kernel(
        anchor,  # *elem: every address is anchor + an element offset (one UVA space)
        seg_dev,  # *i64 [S]: device plane start, elements from anchor
        seg_stride,  # *i64 [S]: device elements per block
        seg_host,  # *i64 [S]: offset of this plane inside a host row, elements
        seg_len,  # *i64 [S]: elements per run
        idx,  # *i64 [2, n]: GPU block ids, then host rows
        n,
        host_base,  # first host row, elements from anchor (arena or staging buffer)
        host_row,  # elements per host row
        num_segs,
        chunks_per_seg,
        TO_HOST: tl.constexpr,
        BLOCK: tl.constexpr,  # elements per work item
        VEC: tl.constexpr,  # elements per aligned vector (16 B when the layout allows)
        EVEN: tl.constexpr,  # every run is a whole number of BLOCKs: no masks
    ):
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        per_blk = num_segs * chunks_per_seg
        total = n * per_blk
        lane = tl.arange(0, BLOCK)
        for w in range(pid, total, nprog):
            i = w // per_blk
            r = w - i * per_blk
            s = r // chunks_per_seg
            c = r - s * chunks_per_seg
            gpu_blk = tl.load(idx + i)
            row = tl.load(idx + n + i)
            start = c * BLOCK
            dev_off = tl.multiple_of(tl.load(seg_dev + s) + gpu_blk * tl.load(seg_stride + s) + start, VEC)
            host_off = tl.multiple_of(host_base + row * host_row + tl.load(seg_host + s) + start, VEC)
            if EVEN:
                if TO_HOST:
                    v = tl.load(anchor + dev_off + lane, eviction_policy="evict_first")
                    tl.store(anchor + host_off + lane, v)
                else:
                    v = tl.load(anchor + host_off + lane, eviction_policy="evict_first")
                    tl.store(anchor + dev_off + lane, v)
            else:
                length = tl.multiple_of(tl.load(seg_len + s), VEC)
                mask = (start + lane) < length
                if TO_HOST:
                    v = tl.load(anchor + dev_off + lane, mask=mask, eviction_policy="evict_first")
                    tl.store(anchor + host_off + lane, v, mask=mask)
                else:
                    v = tl.load(anchor + host_off + lane, mask=mask, eviction_policy="evict_first")
                    tl.store(anchor + dev_off + lane, v, mask=mask)

    _TRITON_KERNEL = _kvbm_copy_kernel
    return _TRITON_KERNEL


_CUPY_SOURCE = r"""
extern "C" __global__ void __launch_bounds__(THREADS)
kvbm_copy(const long long* __restrict__ seg_dev, const long long* __restrict__ seg_stride,
          const long long* __restrict__ seg_host, const long long* __restrict__ seg_len,
          const long long* __restrict__ idx, long long n, long long host_base, long long host_row,
          int num_segs, int chunks_per_seg, int to_host, unsigned long long anchor)
{
    // Byte offsets from ``anchor``; every run, base and stride is 16-byte aligned.
    const long long per_blk = (long long)num_segs * chunks_per_seg;
    const long long total = n * per_blk;
    for (long long w = blockIdx.x; w < total; w += gridDim.x) {
        const long long i = w / per_blk;
        const long long r = w - i * per_blk;
        const int s = (int)(r / chunks_per_seg);
        const int c = (int)(r - (long long)s * chunks_per_seg);
        const long long start = (long long)c * CHUNK;
        const long long len = seg_len[s];
        const unsigned long long dev = anchor + seg_dev[s] + idx[i] * seg_stride[s] + start;
        const unsigned long long host = anchor + host_base + idx[n + i] * host_row + seg_host[s] + start;
        const uint4* __restrict__ src = (const uint4*)(to_host ? dev : host);
        uint4* __restrict__ dst = (uint4*)(to_host ? host : dev);
        long long rem = len - start;
        const int nvec = (int)((rem < CHUNK ? rem : CHUNK) >> 4);
        uint4 v[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int k = threadIdx.x + u * THREADS;
            if (k < nvec) v[u] = __ldcs(src + k);
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int k = threadIdx.x + u * THREADS;
            if (k < nvec) dst[k] = v[u];
        }
    }
}
"""


def cupy_kernel(chunk_bytes: int) -> Any:
    """The CUDA C kernel through CuPy, compiled once per ``chunk_bytes`` (a multiple of
    ``16 * CUPY_THREADS``: each thread moves ``UNROLL`` 16-byte vectors of a work item)."""
    if chunk_bytes in _CUPY_KERNELS:
        return _CUPY_KERNELS[chunk_bytes]
    import cupy

    unroll = chunk_bytes // (16 * CUPY_THREADS)
    if unroll < 1 or unroll * 16 * CUPY_THREADS != chunk_bytes:
        raise ValueError(f"cupy backend needs chunk_bytes a multiple of {16 * CUPY_THREADS}")
    kernel = cupy.RawKernel(
        _CUPY_SOURCE, "kvbm_copy",
        options=(f"-DTHREADS={CUPY_THREADS}", f"-DCHUNK={chunk_bytes}", f"-DUNROLL={unroll}"),
    )
    _CUPY_KERNELS[chunk_bytes] = kernel
    return kernel

