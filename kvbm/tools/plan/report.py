"""From replay results to an answer: table, knees, recommended settings, TTFT estimate, plots."""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kvbm.config import env_var
from kvbm.tools.plan.simulate import PointResult

logger = logging.getLogger(__name__)

GB = 1e9  # kvbm's GB settings are 1e9 bytes
#: A tier is worth having only if it serves at least this share of all prompt tokens.
MIN_GAIN = 0.01
#: Recommend the smallest size that gets this share of the largest size's gain.
GAIN_SHARE = 0.95
_DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2, "fp8": 1, "float8": 1,
                "fp8_e4m3": 1, "fp8_e5m2": 1, "int8": 1}


class PlanError(ValueError):
    """Bad input to ``kvbm plan``; the message names the flag and the fix."""


def bytes_per_block_from_model(model: str, block_size: int, kv_dtype: str = "auto") -> int:
    """layers x 2 (K and V) x KV heads x head dim x dtype bytes x block size, from config.json.

    The total over tensor-parallel ranks, which is what kvbm's GB settings
    mean. Models with compressed KV (MLA) need ``--bytes-per-block``.
    """
    path = Path(model) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PlanError(f"cannot read {path} ({e}); pass --bytes-per-block (one KV block's bytes) instead") from None
    config = config.get("text_config") or config
    try:
        layers = int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    except (KeyError, TypeError, ValueError):
        raise PlanError(f"{path} lacks the attention shape (num_hidden_layers, num_attention_heads, hidden_size); "
                        "pass --bytes-per-block instead") from None
    dtype = kv_dtype if kv_dtype != "auto" else str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    if dtype not in _DTYPE_BYTES:
        raise PlanError(f"unknown KV dtype {dtype!r}; pass --kv-dtype (one of {', '.join(_DTYPE_BYTES)}) or "
                        "--bytes-per-block")
    return layers * 2 * kv_heads * head_dim * _DTYPE_BYTES[dtype] * block_size


def parse_sizes(text: str, bytes_per_block: int | None, flag: str) -> list[int]:
    """``"1000,4000"`` (blocks) or ``"2GB,8GB"`` (needs bytes per block) -> block counts."""
    sizes = []
    for item in text.split(","):
        item = item.strip().upper()
        in_gb = item.endswith("GB")
        if in_gb and not bytes_per_block:
            raise PlanError(f"{flag} {text!r}: sizes in GB need --model or --bytes-per-block")
        try:
            n = int(float(item[:-2]) * GB // bytes_per_block) if in_gb else int(item)  # type: ignore[operator]
        except (ValueError, OverflowError):
            raise PlanError(f"{flag} {text!r}: expected block counts or GB sizes, e.g. {flag} 1000,4000 or "
                            f"{flag} 2GB,8GB") from None
        if n < 1:
            raise PlanError(f"{flag} {text!r}: {item} holds no block")
        sizes.append(n)
    return sorted(set(sizes))


def grid(lo: int, hi: int, points: int) -> list[int]:
    """About ``points`` block counts spaced evenly on a log scale from lo to hi."""
    lo, hi = max(1, lo), max(1, hi)
    if hi <= lo or points < 2:
        return [hi]
    ratio = (hi / lo) ** (1 / (points - 1))
    return sorted({max(1, round(lo * ratio**k)) for k in range(points - 1)} | {hi})


def knee(sizes: Sequence[int], values: Sequence[float]) -> int | None:
    """Index of the knee (Kneedle on a log size axis): the point farthest above the chord
    from where the curve starts rising to its last point; None for a flat or straight curve."""
    if len(sizes) < 3 or values[-1] - values[0] <= 1e-9:
        return None
    y0, y1 = values[0], values[-1]
    # Sizes too small to help at all would bend the chord: start at the last of them.
    start = max(0, next(i for i, v in enumerate(values) if v > y0 + 0.01 * (y1 - y0)) - 1)
    lx = [math.log(s) for s in sizes]
    x0, x1 = lx[start], lx[-1]
    if x1 <= x0:
        return None
    diffs = {i: (values[i] - y0) / (y1 - y0) - (lx[i] - x0) / (x1 - x0) for i in range(start, len(sizes))}
    best = max(diffs, key=diffs.__getitem__)
    return best if diffs[best] > 0.01 else None


def smallest_sufficient(values: Sequence[float], share: float = GAIN_SHARE) -> int:
    """Index of the first value reaching ``share`` of the largest."""
    top = max(values)
    return next(i for i, v in enumerate(values) if v >= share * top - 1e-12)


@dataclass
class Rates:
    """Measured or assumed speeds for the TTFT estimate (None: unknown)."""

    prefill_tokens_per_s: float | None = None
    host_gbps: float | None = None
    disk_gbps: float | None = None

    def saved_seconds(self, r: PointResult, block_size: int, bytes_per_block: int | None) -> float | None:
        """Mean TTFT saved per request: hit tokens not prefilled, minus the time to load them.

        Linear in tokens: it ignores queueing and attention's growth with
        context, so read it as an order of magnitude.
        """
        if not self.prefill_tokens_per_s:
            return None
        saved = (r.host_hit_blocks + r.disk_hit_blocks) * block_size / self.prefill_tokens_per_s
        if bytes_per_block:
            if self.host_gbps:
                saved -= r.host_hit_blocks * bytes_per_block / (self.host_gbps * GB)
            if self.disk_gbps:
                saved -= r.disk_hit_blocks * bytes_per_block / (self.disk_gbps * GB)
        return saved / max(r.requests, 1)


@dataclass
class Plan:
    """Everything ``kvbm plan`` found, ready to print, plot and save."""

    trace_path: str
    requests: int
    prompt_tokens: int
    block_size: int
    gpu_blocks: int
    bytes_per_block: int | None
    baseline: PointResult  # vLLM alone
    host_sweep: list[PointResult]
    disk_sweep: list[PointResult] = field(default_factory=list)  # at host_for_disk, filter on and off
    host_for_disk: int | None = None
    rates: Rates = field(default_factory=Rates)
    gpu_shortfall: int = 0
    notes: list[str] = field(default_factory=list)

    # ---- derived ---------------------------------------------------------------------
    def share(self, r: PointResult, tier: str) -> float:
        return r.fractions(self.block_size)[tier]

    def disk_curve(self, disk_filter: bool) -> list[PointResult]:
        return [r for r in self.disk_sweep if r.disk_filter == disk_filter]

    def recommended_host(self) -> PointResult | None:
        """The smallest G2 that gets 95% of the largest G2's gain, and not below the curve's knee.

        Both rules, so the recommendation never contradicts the knee printed beside it: on a curve
        still rising steeply where it crosses 95% (the refined sizes around the recommendation make
        such a stretch dense), 95% alone picked 84 blocks while the knee was at 89."""
        gains = [self.share(r, "g2") for r in self.host_sweep]
        if not gains or max(gains) < MIN_GAIN:
            return None
        i = smallest_sufficient(gains)
        k = knee([r.host_blocks for r in self.host_sweep], gains) if len(gains) >= 3 else None
        return self.host_sweep[max(i, k if k is not None else i)]

    def recommended_disk(self) -> PointResult | None:
        """The disk point to recommend (filter on unless off serves clearly more), or None."""
        if not self.disk_sweep or self.host_for_disk is None:
            return None
        alone = next((r for r in self.host_sweep if r.host_blocks == self.host_for_disk), None)
        base = self.share(alone, "g2") if alone is not None else 0.0
        best: tuple[float, list[PointResult], list[float]] | None = None
        for disk_filter in (True, False):
            curve = self.disk_curve(disk_filter)
            if not curve:
                continue
            extra = [self.share(r, "g2") + self.share(r, "g3") - base for r in curve]
            if best is None or max(extra) >= best[0] + MIN_GAIN:
                best = (max(extra), curve, extra)
        if best is None or best[0] < MIN_GAIN:
            return None
        _, curve, extra = best
        return curve[smallest_sufficient(extra)]

    # ---- text ----------------------------------------------------------------------------
    def size(self, blocks: int) -> str:
        if not blocks:
            return "-"
        if not self.bytes_per_block:
            return f"{blocks} blk"
        return f"{blocks} blk ({_gb(blocks * self.bytes_per_block)})"

    def rows(self) -> list[dict[str, str]]:
        out = []
        for label, results in (("vLLM alone", [self.baseline]), ("G2", self.host_sweep),
                               ("G2+G3 filter", self.disk_curve(True)), ("G2+G3 no filter", self.disk_curve(False))):
            for r in results:
                f = r.fractions(self.block_size)
                saved = self.rates.saved_seconds(r, self.block_size, self.bytes_per_block)
                out.append({
                    "config": label, "G2": self.size(r.host_blocks), "G3": self.size(r.disk_blocks),
                    "from G1": _pct(f["g1"]), "from G2": _pct(f["g2"]), "from G3": _pct(f["g3"]),
                    "computed": _pct(f["computed"]),
                    "kvbm hit G2/G3": f"{100 * r.host_hit_rate:.1f}/{100 * r.disk_hit_rate:.1f}%",
                    "disk writes": self.size(r.spilled_blocks) if r.disk_blocks else "-",
                    "TTFT saved": "-" if saved is None else f"{1000 * saved:.0f} ms",
                })
        return out

    def table(self) -> str:
        rows = self.rows()
        columns = list(rows[0])
        if all(row["TTFT saved"] == "-" for row in rows):
            columns.remove("TTFT saved")
        widths = {c: max(len(c), *(len(row[c]) for row in rows)) for c in columns}
        lines = ["  ".join(c.rjust(widths[c]) if i else c.ljust(widths[c]) for i, c in enumerate(columns))]
        lines.append("-" * len(lines[0]))
        for row in rows:
            lines.append("  ".join(row[c].rjust(widths[c]) if i else row[c].ljust(widths[c])
                                   for i, c in enumerate(columns)))
        return "\n".join(lines)

    def knees(self) -> list[str]:
        lines = []
        curves = [("G2", self.host_sweep, lambda r: r.host_blocks, "g2")]
        for disk_filter in (True, False):
            name = f"G3 ({'filter' if disk_filter else 'no filter'}, G2 {self.host_for_disk} blk)"
            curves.append((name, self.disk_curve(disk_filter), lambda r: r.disk_blocks, "g3"))
        for name, results, size_of, tier in curves:
            if len(results) < 3:
                continue
            sizes = [size_of(r) for r in results]
            values = [self.share(r, tier) for r in results]
            k = knee(sizes, values)
            if k is None:
                lines.append(f"{name}: no knee (the curve is flat or straight over {self.size(sizes[0])} .. "
                             f"{self.size(sizes[-1])})")
            else:
                lines.append(f"{name}: knee at {self.size(sizes[k])}: {_pct(values[k])} of prompt tokens, "
                             f"{_pct(values[-1])} at {self.size(sizes[-1])}")
            rec = self.recommended_host() if tier == "g2" else None
            if rec is not None and (k is None or sizes[k] != rec.host_blocks):
                lines.append(f"  recommended G2 {self.size(rec.host_blocks)}: the smallest size with "
                             f"{GAIN_SHARE:.0%} of the largest gain ({_pct(self.share(rec, 'g2'))} of prompt tokens), "
                             "never below the knee")
        return lines

    def recommendation(self) -> list[str]:
        """The settings to use and what they buy, or why no tier is needed."""
        alone = self.baseline.fractions(self.block_size)
        host = self.recommended_host()
        if host is None:
            top = max((self.share(r, "g2") for r in self.host_sweep), default=0.0)
            return [f"No kvbm tier needed: vLLM's own prefix cache ({self.gpu_blocks} blocks) already serves "
                    f"{_pct(alone['g1'])} of prompt tokens, and a G2 holding every block of the trace would add only "
                    f"{_pct(top)}."]
        disk = self.recommended_disk()
        host_blocks = host.host_blocks if disk is None else self.host_for_disk or host.host_blocks
        lines = ["Recommended settings:", "  " + self._setting("cpu_cache", host_blocks)]
        final = host
        if disk is not None:
            lines.append("  " + self._setting("disk_cache", disk.disk_blocks))
            if not disk.disk_filter:
                other = self._same_size(disk, disk_filter=True)
                writes = f"; disk writes {self.size(disk.spilled_blocks)} vs {self.size(other.spilled_blocks)}" \
                    if other is not None else ""
                lines.append(f"  {env_var('disable_disk_offload_filter')}=true   # the filter would cost "
                             f"{_pct(self._filter_cost(disk))} of prompt tokens here{writes}")
            if host_blocks != host.host_blocks:
                lines.append(f"  (G2 as given by --g2-for-g3; G2 alone serves {_pct(self.share(host, 'g2'))} "
                             f"at {self.size(host.host_blocks)})")
            final = disk
        elif self.disk_sweep:
            lines.append("  no disk tier: it would add less than "
                         f"{_pct(MIN_GAIN)} of prompt tokens at G2 {self.size(self.host_for_disk or 0)}")
        f = final.fractions(self.block_size)
        lines.append(f"Expected: prompt tokens computed {_pct(alone['computed'])} -> {_pct(f['computed'])} "
                     f"(G2 serves {_pct(f['g2'])}, G3 {_pct(f['g3'])}; kvbm hit rate "
                     f"{100 * final.host_hit_rate:.1f}% G2, {100 * final.disk_hit_rate:.1f}% G3)")
        saved = self.rates.saved_seconds(final, self.block_size, self.bytes_per_block)
        if saved is not None:
            lines.append(f"Estimated mean TTFT saved: {1000 * saved:.0f} ms per request "
                         f"({self._rates_text()})")
        return lines

    def _same_size(self, disk: PointResult, disk_filter: bool) -> PointResult | None:
        return next((r for r in self.disk_curve(disk_filter) if r.disk_blocks == disk.disk_blocks), None)

    def _filter_cost(self, disk: PointResult) -> float:
        other = self._same_size(disk, disk_filter=True)
        return 0.0 if other is None else self.share(disk, "g3") - self.share(other, "g3")

    def _setting(self, tier: str, blocks: int) -> str:
        count = env_var(f"{tier}_override_num_blocks")
        if not self.bytes_per_block:
            return f"{count}={blocks}"
        gb = math.ceil(blocks * self.bytes_per_block / GB * 100) / 100  # kvbm floors GB to whole blocks
        gb_var = env_var("cpu_cache_gb" if tier == "cpu_cache" else "disk_cache_gb")
        return f"{gb_var}={gb:g}   # {blocks} blocks x {self.bytes_per_block} bytes; or {count}={blocks}"

    def _rates_text(self) -> str:
        r = self.rates
        parts = [f"prefill {r.prefill_tokens_per_s:g} tokens/s"]
        parts.append(f"G2->GPU {r.host_gbps:g} GB/s" if r.host_gbps else "G2 loads not counted (no --host-gbps)")
        if self.disk_sweep:
            parts.append(f"G3->GPU {r.disk_gbps:g} GB/s" if r.disk_gbps else "G3 loads not counted (no --disk-gbps)")
        return ", ".join(parts)

    def summary(self) -> str:
        lines = [
            f"trace: {self.trace_path}: {self.requests:,} requests, {self.prompt_tokens:,} prompt tokens, "
            f"{self.block_size}-token blocks"
            + (f", {self.bytes_per_block:,} bytes per block" if self.bytes_per_block else ""),
            f"vLLM's GPU prefix cache: {self.gpu_blocks} blocks",
        ]
        if self.gpu_shortfall:
            lines.append(f"note: the trace's concurrent requests need more than {self.gpu_blocks} GPU blocks at "
                         f"times ({self.gpu_shortfall} blocks short in all); vLLM would have queued them, so G1 "
                         "is modelled approximately there")
        lines += [f"note: {n}" for n in self.notes]
        lines += ["", self.table(), "", *self.knees(), "", *self.recommendation()]
        return "\n".join(lines)

    # ---- files ---------------------------------------------------------------------------
    def write_files(self, out_dir: Path, plots: bool = True) -> list[Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = [out_dir / "plan.csv", out_dir / "plan.json"]
        rows = self.rows()
        with open(paths[0], "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        data = {
            "trace": self.trace_path, "requests": self.requests, "prompt_tokens": self.prompt_tokens,
            "block_size": self.block_size, "gpu_blocks": self.gpu_blocks, "bytes_per_block": self.bytes_per_block,
            "baseline": self.baseline.as_dict(), "host_sweep": [r.as_dict() for r in self.host_sweep],
            "disk_sweep": [r.as_dict() for r in self.disk_sweep], "host_for_disk": self.host_for_disk,
            "recommendation": self.recommendation(), "knees": self.knees(),
        }
        paths[1].write_text(json.dumps(data, indent=2) + "\n")
        if plots:
            paths += write_plots(self, out_dir)
        return paths


def write_plots(plan: Plan, out_dir: Path) -> list[Path]:
    """plan.png: where prompt tokens come from vs G2 size, and vs G3 size (filter on/off)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed, so no plots: pip install 'kvbm-vllm[bench]'")
        return []
    panels = 2 if plan.disk_sweep else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.2 * panels, 4.3), squeeze=False)
    scale, unit = (plan.bytes_per_block / GB, "GB") if plan.bytes_per_block else (1.0, "blocks")
    alone = plan.baseline.fractions(plan.block_size)

    def draw(ax, results, size_of, tier, label, color, style="-"):
        sizes = [size_of(r) for r in results]
        xs = [s * scale for s in sizes]
        ys = [100 * plan.share(r, tier) for r in results]
        ax.plot(xs, ys, style, color=color, marker="o", markersize=3.5, label=f"from {label}")
        computed = [100 * plan.share(r, "computed") for r in results]
        ax.plot(xs, computed, style, color=color, marker=".", alpha=0.4, label=f"still computed ({label})")
        k = knee(sizes, ys)
        if k is not None:
            ax.plot([xs[k]], [ys[k]], "D", color=color, markersize=7, markerfacecolor="none")
            ax.annotate("knee", (xs[k], ys[k]), xytext=(6, -12), textcoords="offset points", fontsize=8,
                        color=color)

    ax = axes[0][0]
    draw(ax, plan.host_sweep, lambda r: r.host_blocks, "g2", "G2", "tab:blue")
    ax.axhline(100 * alone["g1"], color="0.5", ls=":", label=f"from vLLM's GPU cache ({plan.gpu_blocks} blk)")
    ax.axhline(100 * alone["computed"], color="0.2", ls="--", lw=0.8, label="computed, vLLM alone")
    rec = plan.recommended_host()
    if rec is not None:
        ax.axvline(rec.host_blocks * scale, color="tab:green", lw=0.8, alpha=0.6, label="recommended, G2 alone")
    if plan.disk_sweep and plan.host_for_disk and (rec is None or plan.host_for_disk != rec.host_blocks):
        ax.axvline(plan.host_for_disk * scale, color="tab:orange", lw=0.8, alpha=0.6, ls="--",
                   label="G2 of the G3 sweep")
    ax.set_xlabel(f"G2 (host) size, {unit}")
    ax.set_title("prompt tokens by source vs G2 size", fontsize=10)
    if plan.disk_sweep:
        ax = axes[0][1]
        for disk_filter, color, style in ((True, "tab:orange", "-"), (False, "tab:purple", "--")):
            curve = plan.disk_curve(disk_filter)
            if curve:
                draw(ax, curve, lambda r: r.disk_blocks, "g3", f"G3, {'filter' if disk_filter else 'no filter'}",
                     color, style)
        rec = plan.recommended_disk()
        if rec is not None:
            ax.axvline(rec.disk_blocks * scale, color="tab:green", lw=0.8, alpha=0.6, label="recommended")
        ax.set_xlabel(f"G3 (disk) size, {unit}; G2 = {plan.size(plan.host_for_disk or 0)}")
        ax.set_title("prompt tokens by source vs G3 size", fontsize=10)
    for row in axes:
        for ax in row:
            ax.set_xscale("log")
            ax.set_ylim(0, 100)
            ax.set_ylabel("% of prompt tokens")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"kvbm plan: {plan.requests:,} requests, {plan.block_size}-token blocks", fontsize=10)
    fig.tight_layout()
    path = out_dir / "plan.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _gb(n: float) -> str:
    if n >= 0.1 * GB:
        return f"{n / GB:.2f} GB"
    return f"{n / 1e6:.1f} MB"
