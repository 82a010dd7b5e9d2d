"""Native AIO reads (kvbm.storage.aio) against a real O_DIRECT file: the same bytes as
``os.preadv``, every request reported once, the kernel's refusals handed back, and nothing
left in flight when a completion callback raises."""

from __future__ import annotations

import errno
import mmap
import os

import numpy as np
import pytest

from kvbm.storage.aio import IOVEC, AioContext

PAGE = 4096


@pytest.fixture
def ctx():
    context, why = AioContext.open(4)
    if context is None:
        pytest.skip(f"native AIO not available here: {why}")
    yield context
    context.close()


@pytest.fixture
def direct_file(tmp_path):
    """A 64-page file of random bytes, opened O_DIRECT (skipped where the filesystem refuses)."""
    path = tmp_path / "data"
    data = np.random.default_rng(0).integers(0, 256, 64 * PAGE, dtype=np.uint8)
    path.write_bytes(data.tobytes())
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as e:
        pytest.skip(f"O_DIRECT not supported on {tmp_path}: {e}")
    yield fd, data
    os.close(fd)


def aligned(pages: int) -> tuple[mmap.mmap, np.ndarray]:
    mm = mmap.mmap(-1, pages * PAGE)
    return mm, np.frombuffer(mm, dtype=np.uint8)


def requests(buf: np.ndarray, spans: list[list[int]], offsets: list[int]):
    """One request per span of page counts, each span's pieces in consecutive pages of ``buf``."""
    iov, first, counts, at = [], [], [], 0
    for span in spans:
        first.append(len(iov))
        counts.append(len(span))
        for pages in span:
            iov.append((buf.ctypes.data + at * PAGE, pages * PAGE))
            at += pages
    return (np.array(offsets, dtype=np.int64) * PAGE, np.array(iov, dtype=IOVEC).reshape(-1, 2),
            np.array(first, dtype=np.int64), np.array(counts, dtype=np.int64))


def test_reads_equal_the_file_and_every_request_is_reported_once(ctx, direct_file):
    """More requests than the context's depth (4): submitted in waves as completions come."""
    fd, data = direct_file
    spans = [[1, 2], [3], [1, 1, 1], [2], [1], [4, 1], [1], [2, 2], [1]]
    offsets = [0, 10, 20, 30, 40, 45, 50, 55, 63]
    _, buf = aligned(sum(map(sum, spans)))
    seen: dict[int, int] = {}
    ctx.preadv(fd, *requests(buf, spans, offsets),
               lambda reqs, res: seen.update({r: g for r, g in zip(reqs.tolist(), res.tolist(), strict=True)}))
    assert seen == {r: sum(s) * PAGE for r, s in enumerate(spans)}
    at = 0
    for span, off in zip(spans, offsets, strict=True):
        n = sum(span) * PAGE
        np.testing.assert_array_equal(buf[at : at + n], data[off * PAGE : off * PAGE + n])
        at += n


def test_a_read_past_the_end_is_short(ctx, direct_file):
    fd, data = direct_file
    _, buf = aligned(4)
    seen: dict[int, int] = {}
    ctx.preadv(fd, *requests(buf, [[2, 2]], [62]), lambda reqs, res: seen.update(zip(reqs.tolist(), res.tolist())))
    assert seen == {0: 2 * PAGE}
    np.testing.assert_array_equal(buf[: 2 * PAGE], data[62 * PAGE :])


def test_refused_requests_come_back_with_the_error(ctx, tmp_path):
    """A file the kernel will not read this way (here: a directory) is reported, not raised: the
    caller reads those blocks another way."""
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _, buf = aligned(3)
        seen: dict[int, int] = {}
        ctx.preadv(fd, *requests(buf, [[1], [1], [1]], [0, 1, 2]),
                   lambda reqs, res: seen.update(zip(reqs.tolist(), res.tolist())))
    finally:
        os.close(fd)
    assert sorted(seen) == [0, 1, 2] and all(g < 0 for g in seen.values())
    assert set(seen.values()) <= {-errno.EINVAL, -errno.EISDIR, -errno.EBADF}


def test_a_raising_callback_still_waits_for_every_read(ctx, direct_file):
    """The kernel writes into the caller's buffers until a read completes: nothing may be in
    flight when the exception leaves (the context takes a new batch right after)."""
    fd, data = direct_file
    _, buf = aligned(8)

    def boom(reqs, res):
        raise RuntimeError("verification bug")

    with pytest.raises(RuntimeError, match="verification bug"):
        ctx.preadv(fd, *requests(buf, [[1]] * 8, list(range(8))), boom)
    seen: dict[int, int] = {}
    ctx.preadv(fd, *requests(buf, [[1]] * 4, [8, 9, 10, 11]), lambda reqs, res: seen.update(zip(reqs.tolist(),
                                                                                                 res.tolist())))
    assert seen == {0: PAGE, 1: PAGE, 2: PAGE, 3: PAGE}
    np.testing.assert_array_equal(buf[: 4 * PAGE], data[8 * PAGE : 12 * PAGE])
