"""Request traces for ``kvbm plan``: the log kvbm writes while serving, and prompt files users bring.

Both formats become one in-memory :class:`Trace`: per request, when it was
scheduled, when it finished, its prompt and output lengths and the identities
of its full blocks as small dense ints (the same int for the same block
hash), so the simulator never depends on how wide kvbm's hashes are.

kvbm's request log (``trace_file``, see config) is JSON lines: a header written
when a server starts, then one line per finished request::

    {"kvbm_trace": 1, "block_size": 128, "gpu_blocks": 40, "bytes_per_block": 1310720, "load_mode": "auto", ...}
    {"t": 1718000000.1, "end": 1718000001.9, "prompt": 2113, "output": 16, "served": [9, 0], "hashes": [...]}

``t`` is when vLLM first scheduled the request (its lookup), ``end`` when it
finished, ``served`` the (G2, G3) blocks kvbm loaded for it then; ``hashes``
are kvbm's chained block hashes (hex) of every full block computed, prompt
then output. No token or text is written, so the file can be
handed to someone else; note that anyone holding the same model can still
confirm a *guessed* prompt by hashing it.

A prompt file is JSON lines of ``{"prompt": "text"}`` or
``{"prompt_token_ids": [...]}`` with optional ``timestamp`` (seconds),
``output_tokens``, ``end`` or ``duration``, ``cache_salt`` and ``lora``.
Text is tokenized with the model's own tokenizer, as vLLM's completions API
does; tokens of generated answers are unknown, so output blocks count as
blocks never seen again.
"""

from __future__ import annotations

import json
import logging
import math
import os
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvbm.config import MAX_COUNT
from kvbm.core.hashing import engine_root, extend_hashes, request_root
from kvbm.core.tiers import LOAD_MODES
from kvbm.runtime.trace import FORMAT_VERSION, TraceWriter, open_trace_file  # noqa: F401 (the writer, re-exported)

logger = logging.getLogger(__name__)


#: Bounds on what one trace line may claim. A trace may come from anyone (it is
#: meant to be shared), and without them one short line can make the replay
#: allocate without end (``"output_tokens": 1000000000000`` is 60 billion blocks
#: never seen again), overflow a float (``"bytes_per_block": 1e400``) or build a
#: GPU pool of a trillion blocks. Each is far above any real server.
#: A line's bytes: a 1M-token prompt as text or token ids fits many times over.
MAX_LINE_BYTES = 1 << 28
#: Prompt plus output tokens of one request (models' contexts reach ~10M tokens).
MAX_REQUEST_TOKENS = 1 << 24
#: Tokens per KV block (vLLM uses 16 to 256).
MAX_BLOCK_SIZE = 1 << 16
#: Blocks of vLLM's own pool (the replay builds it: ~100 bytes a block).
MAX_GPU_BLOCKS = 1 << 24
#: One KV block's bytes over all ranks (1 TB; kvbm's GB settings stop at 1e6 GB in all).
MAX_BYTES_PER_BLOCK = 1 << 40
#: Block ids of the whole trace, distinct or not (8 bytes each in memory): ~1 GB. Output
#: blocks of prompt files are made up by the reader, so this bounds its memory, not the file.
MAX_TRACE_BLOCKS = 1 << 27


class TraceError(ValueError):
    """The trace cannot be read; the message names the file, the line and the fix."""


@dataclass
class TraceRequest:
    """One request as the simulator sees it."""

    time: float
    end: float
    prompt_tokens: int
    output_tokens: int
    #: Dense ids of its full blocks in chain order (prompt, then output).
    blocks: array
    #: (G2, G3) blocks kvbm served it on the server that wrote the trace (kvbm's log only).
    served: tuple[int, int] | None = None


@dataclass
class Trace:
    block_size: int
    requests: list[TraceRequest]
    #: Distinct block ids in ``requests`` (ids are 0 .. num_block_ids - 1).
    num_block_ids: int
    #: From kvbm's header: vLLM's GPU pool and bytes per block, as served.
    gpu_blocks: int | None = None
    bytes_per_block: int | None = None
    #: kvbm's tiers on the server that wrote the trace (blocks; 0: off).
    host_blocks: int | None = None
    disk_blocks: int | None = None
    #: The server's load mode (which tiers load inside the step; see config); None: unknown.
    load_mode: str | None = None
    #: vLLM's token budget per step (a longer prefill is computed in chunks); None: unknown.
    max_num_batched_tokens: int | None = None
    kind: str = "kvbm"
    notes: list[str] = field(default_factory=list)

    @property
    def prompt_tokens(self) -> int:
        return sum(r.prompt_tokens for r in self.requests)


class _Ids:
    """Block hash -> dense id; ``fresh`` gives ids no hash will ever get."""

    def __init__(self) -> None:
        self._ids: dict[Any, int] = {}
        self.count = 0

    def of(self, keys: Iterable[Any]) -> array:
        ids, out = self._ids, array("q")
        for key in keys:
            i = ids.get(key)
            if i is None:
                i = ids[key] = self.count
                self.count += 1
            out.append(i)
        return out

    def fresh(self, n: int) -> array:
        """``n`` ids no hash will ever get (blocks of generated tokens, unknown in prompt files)."""
        out = array("q", range(self.count, self.count + n))
        self.count += n
        return out


# ---- reading ----------------------------------------------------------------------


def read_trace(path: str | Path, *, model: str | None = None, block_size: int | None = None,
               limit: int | None = None, progress: bool | None = None) -> Trace:
    """Read either format (detected from the first line); requests sorted by time.

    ``model`` (a local directory) tokenizes prompt text. ``block_size``: the
    block size to hash prompt files at (default 16, vLLM's on GPUs); a kvbm
    log was hashed at the served block size, which it must then match.
    """
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"{path}: no such trace file")
    head = next(_lines(path), None)
    if head is None:
        raise TraceError(f"{path}: the trace is empty")
    if "kvbm_trace" in head[1] or "hashes" in head[1]:
        trace = _read_kvbm(_lines(path), path, block_size, limit, progress)
    else:
        trace = _read_prompts(_lines(path), path, model, block_size or 16, limit, progress)
    if not trace.requests:
        raise TraceError(f"{path}: no request in the trace")
    trace.requests.sort(key=lambda r: r.time)
    return trace


def _lines(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) of every non-blank line."""
    with open(path, "rb") as f:
        number = 0
        while raw := f.readline(MAX_LINE_BYTES + 1):
            number += 1
            if len(raw) > MAX_LINE_BYTES:
                raise TraceError(f"{path}:{number}: the line is longer than {MAX_LINE_BYTES >> 20} MiB; a trace has "
                                 "one request per line (is this a trace?)")
            if raw.strip():
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise TraceError(f"{path}:{number}: not UTF-8 text; a trace is JSON lines") from None
                yield number, _parse_line(line, path, number)


def _parse_line(line: str, path: Path, number: int) -> dict:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as e:
        raise TraceError(f"{path}:{number}: not JSON ({e.msg}); a trace has one JSON object per line") from None
    except RecursionError:
        raise TraceError(f"{path}:{number}: JSON nested too deeply to be a trace line (a trace line is one flat "
                         "object)") from None
    except ValueError as e:  # e.g. an integer of thousands of digits
        raise TraceError(f"{path}:{number}: not a usable JSON line ({e})") from None
    if not isinstance(value, dict):
        raise TraceError(f"{path}:{number}: expected a JSON object, got {type(value).__name__}")
    return value


def _show(value: Any) -> str:
    """A bad value for a message, short whatever its size."""
    if isinstance(value, int) and abs(value) >= 10**30:
        return f"a {len(str(abs(value)))}-digit number"
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:40]}... ({type(value).__name__} of {len(value):,})"


def _number(rec: dict, key: str, path: Path, number: int, default: float | None = None) -> float:
    value = rec.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise TraceError(f"{path}:{number}: {key!r} must be a number >= 0, got {_show(value)}")
    return value


def _count(rec: dict, key: str, path: Path, number: int, default: int | None = None,
           most: int = MAX_REQUEST_TOKENS) -> int:
    value = rec.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= most:
        raise TraceError(f"{path}:{number}: {key!r} must be a whole number from 0 to {most:,}, got {_show(value)}")
    return value


def _text(rec: dict, key: str, path: Path, number: int) -> str | None:
    """A string field (prompt, cache_salt, lora) that a tokenizer and an encoder can take."""
    value = rec.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise TraceError(f"{path}:{number}: {key!r} must be a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TraceError(f"{path}:{number}: {key!r} is not valid Unicode text: character {e.start} is a lone "
                         f"surrogate ({value[e.start]!a}), which no tokenizer takes; fix or drop that line") from None
    return value


def _bar(progress: bool | None, desc: str):  # -> tqdm
    from tqdm import tqdm

    return tqdm(desc=desc, unit="req", disable=None if progress is None else not progress, leave=False)


def _read_kvbm(lines: Iterator[tuple[int, dict]], path: Path, block_size: int | None, limit: int | None,
               progress: bool | None) -> Trace:
    ids = _Ids()
    trace = Trace(block_size=0, requests=[], num_block_ids=0, kind="kvbm")
    total_blocks = 0
    with _bar(progress, "reading trace") as bar:
        for number, rec in lines:
            if "kvbm_trace" in rec:
                _apply_header(trace, rec, path, number)
                continue
            if not trace.block_size:
                raise TraceError(f"{path}:{number}: request before the trace's header line")
            hashes = rec.get("hashes")
            # Hex strings are ids as they are: equal hashes, equal strings; no width assumed.
            if not isinstance(hashes, list) or not all(type(h) is str for h in hashes):
                raise TraceError(f"{path}:{number}: 'hashes' must be a list of hex strings")
            if len(hashes) > MAX_REQUEST_TOKENS:
                raise TraceError(f"{path}:{number}: 'hashes' lists {len(hashes):,} blocks; at most "
                                 f"{MAX_REQUEST_TOKENS:,} per request")
            start = _number(rec, "t", path, number)
            total_blocks += len(hashes)
            _check_total(total_blocks, path, number)
            trace.requests.append(TraceRequest(
                time=start, end=max(start, _number(rec, "end", path, number, start)),
                prompt_tokens=_count(rec, "prompt", path, number), output_tokens=_count(rec, "output", path, number, 0),
                blocks=ids.of(hashes), served=_served(rec, path, number),
            ))
            bar.update(1)
            if limit is not None and len(trace.requests) >= limit:
                break
    if block_size is not None and block_size != trace.block_size:
        raise TraceError(
            f"{path}: the trace was recorded with {trace.block_size}-token blocks (its hashes cover blocks of "
            f"that size); --block-size {block_size} cannot be replayed from it. Drop --block-size"
        )
    trace.num_block_ids = ids.count
    return trace


def _check_total(total_blocks: int, path: Path, number: int) -> None:
    if total_blocks > MAX_TRACE_BLOCKS:
        raise TraceError(f"{path}:{number}: the requests up to this line hold {total_blocks:,} blocks in all, more "
                         f"than the replay keeps in memory ({MAX_TRACE_BLOCKS:,}); replay part of the trace with "
                         f"--limit {max(1, number - 1)}")


def _served(rec: dict, path: Path, number: int) -> tuple[int, int] | None:
    served = rec.get("served")
    if served is None:
        return None
    if (not isinstance(served, list) or len(served) != 2
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in served)):
        raise TraceError(f"{path}:{number}: 'served' must be [G2 blocks, G3 blocks]")
    return served[0], served[1]


def _apply_header(trace: Trace, rec: dict, path: Path, number: int) -> None:
    if rec.get("kvbm_trace") != FORMAT_VERSION:
        raise TraceError(f"{path}:{number}: trace format {rec.get('kvbm_trace')!r}; this kvbm reads version "
                         f"{FORMAT_VERSION}")
    block_size = _count(rec, "block_size", path, number, most=MAX_BLOCK_SIZE)
    if block_size < 1:
        raise TraceError(f"{path}:{number}: 'block_size' must be >= 1")
    if trace.block_size and trace.block_size != block_size:
        raise TraceError(f"{path}:{number}: this part of the trace has {block_size}-token blocks, an earlier "
                         f"part {trace.block_size}; replay servers with different block sizes separately")
    trace.block_size = block_size
    mode = rec.get("load_mode")
    if mode is not None:
        if mode not in LOAD_MODES:
            raise TraceError(f"{path}:{number}: unknown load_mode {mode!r}")
        trace.load_mode = mode
    most = {"gpu_blocks": MAX_GPU_BLOCKS, "bytes_per_block": MAX_BYTES_PER_BLOCK, "host_blocks": MAX_COUNT,
            "disk_blocks": MAX_COUNT, "max_num_batched_tokens": MAX_REQUEST_TOKENS}
    for key in ("gpu_blocks", "bytes_per_block", "host_blocks", "disk_blocks", "max_num_batched_tokens"):
        if rec.get(key) is not None:
            value = _count(rec, key, path, number, most=most[key])
            old = getattr(trace, key)
            if old is not None and old != value:
                trace.notes.append(f"{key} changed within the trace ({old} -> {value}); using {value}")
            setattr(trace, key, value)


def load_tokenizer(model: str):  # -> transformers tokenizer
    """The model's tokenizer from a local directory, offline."""
    if not Path(model).is_dir():
        raise TraceError(f"--model {model!r} is not a local model directory; kvbm plan tokenizes offline, "
                         "so pass the directory holding the model's tokenizer files")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model, local_files_only=True)
    except (OSError, ValueError) as e:
        raise TraceError(f"cannot load the tokenizer from {model}: {e}") from None


#: Tokenize this many prompts per call (fast tokenizers batch in Rust).
_TOKENIZE_BATCH = 512


def _read_prompts(lines: Iterator[tuple[int, dict]], path: Path, model: str | None, block_size: int,
                  limit: int | None, progress: bool | None) -> Trace:
    tokenizer = None
    ids = _Ids()
    root0 = engine_root("kvbm plan")
    trace = Trace(block_size=block_size, requests=[], num_block_ids=0, kind="prompts")
    pending: list[tuple[int, dict]] = []
    total_blocks = 0

    def flush() -> None:
        nonlocal tokenizer, total_blocks
        texts = [rec["prompt"] for _, rec in pending if "prompt" in rec]
        encoded: Iterator[list[int]] = iter(())
        if texts:
            if model is None:
                raise TraceError(f"{path}: prompts are text; pass --model DIR so they are tokenized as the "
                                 "server would")
            tokenizer = tokenizer or load_tokenizer(model)
            try:
                encoded = iter(tokenizer(texts)["input_ids"])
            except Exception as e:  # the tokenizer's own checks (types, lengths): name the lines, not its stack
                first, last = pending[0][0], pending[-1][0]
                raise TraceError(f"{path}:{first}-{last}: the tokenizer refused a 'prompt' on these lines "
                                 f"({type(e).__name__}: {e})") from None
        for number, rec in pending:
            tokens = next(encoded) if "prompt" in rec else rec["prompt_token_ids"]
            request = _prompt_request(rec, tokens, path, number, len(trace.requests), ids, root0, block_size)
            total_blocks += len(request.blocks)
            _check_total(total_blocks, path, number)
            trace.requests.append(request)
        bar.update(len(pending))
        pending.clear()

    with _bar(progress, "reading prompts") as bar:
        for number, rec in lines:
            if "prompt_token_ids" not in rec and "token_ids" in rec:
                rec["prompt_token_ids"] = rec["token_ids"]
            if "prompt" in rec:
                if not isinstance(rec["prompt"], str):
                    raise TraceError(f"{path}:{number}: 'prompt' must be text (or give 'prompt_token_ids')")
                _text(rec, "prompt", path, number)
            elif not (isinstance(rec.get("prompt_token_ids"), list)
                      and all(isinstance(t, int) and not isinstance(t, bool) for t in rec["prompt_token_ids"])):
                raise TraceError(f"{path}:{number}: each line needs 'prompt' (text) or 'prompt_token_ids' "
                                 "(a list of token ids)")
            elif len(rec["prompt_token_ids"]) > MAX_REQUEST_TOKENS:
                raise TraceError(f"{path}:{number}: 'prompt_token_ids' holds {len(rec['prompt_token_ids']):,} "
                                 f"tokens; at most {MAX_REQUEST_TOKENS:,} per request")
            # Lengths and strings are checked before any tokenizing or block is made up.
            output = _count(rec, "output_tokens", path, number, rec.get("output_len", 0))
            if output + len(rec.get("prompt_token_ids") or ()) > MAX_REQUEST_TOKENS:
                raise TraceError(f"{path}:{number}: 'output_tokens' {output:,} plus the prompt is more than "
                                 f"{MAX_REQUEST_TOKENS:,} tokens per request")
            for key in ("cache_salt", "lora", "lora_name"):
                _text(rec, key, path, number)
            pending.append((number, rec))
            if len(pending) >= _TOKENIZE_BATCH:
                flush()
            if limit is not None and len(trace.requests) + len(pending) >= limit:
                break
        flush()
    trace.num_block_ids = ids.count
    return trace


def _prompt_request(rec: dict, tokens: Sequence[int], path: Path, number: int, index: int, ids: _Ids,
                    root0: bytes, block_size: int) -> TraceRequest:
    start = _number(rec, "timestamp", path, number, rec.get("t", float(index)))
    if "end" in rec:
        end = _number(rec, "end", path, number)
    else:
        end = start + _number(rec, "duration", path, number, 0.0)
    output = _count(rec, "output_tokens", path, number, rec.get("output_len", 0))
    if len(tokens) + output > MAX_REQUEST_TOKENS:
        raise TraceError(f"{path}:{number}: the prompt ({len(tokens):,} tokens) plus 'output_tokens' ({output:,}) is "
                         f"more than {MAX_REQUEST_TOKENS:,} tokens per request")
    salt = _text(rec, "cache_salt", path, number)
    lora = _text(rec, "lora", path, number) if "lora" in rec else _text(rec, "lora_name", path, number)
    root = request_root(root0, salt, lora)
    blocks = ids.of(extend_hashes([], tokens, block_size, root))
    # Blocks holding generated tokens: their tokens are unknown, so they match nothing.
    computed = len(tokens) + output - 1 if output else len(tokens)
    blocks.extend(ids.fresh(max(0, computed // block_size - len(blocks))))
    return TraceRequest(time=start, end=max(start, end), prompt_tokens=len(tokens), output_tokens=output,
                        blocks=blocks)


# ---- writing (inside the server) -----------------------------------------------------
