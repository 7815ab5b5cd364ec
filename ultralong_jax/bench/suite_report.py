"""suite.md: the suite's rows as the tables of docs/performance.md (no JAX import)."""

from __future__ import annotations

import datetime


def _gib(x) -> str:
  return "-" if x is None else f"{x / 2**30:.2f}"


def _fmt(x, spec=".1f", scale=1.0) -> str:
  return "-" if x is None else format(x * scale, spec)


def markdown(results: list[dict], command: str) -> str:
  device = next((r["device"] for r in results if r["device"]), None) or {}
  lines = [f"Suite run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on "
           f"{device.get('device_kind', '?')} ({device.get('platform', '?')}), "
           f"jax {device.get('jax', '?')}: `{command}`", ""]
  for r in results:
    if r["status"] != "ok":
      lines.append(f"- **{r['name']}: {r['status']}** after {r['seconds']:.0f} s: "
                   f"{r['error'] or ''}")
  by = lambda s: [row for r in results if r["section"] == s for row in r["rows"]]
  lines += ["", "Kernels, one causal block, forward + backward:", "",
            "| kernel | B | T | documents per row | compile + first s | ms | TFLOP/s | "
            "rel. err vs chunked |",
            "|---|---|---|---|---|---|---|---|"]
  for row in by("kernels"):
    note = row.get("skipped") or row.get("error")
    lines.append(f"| {row['kernel']} | {row['batch']} | {row['seq_len']:,} | {row['documents']} | "
                 + (f"{note} | | | |" if note else
        f"{row['compile_and_first_s']:.1f} | {row['seconds'] * 1e3:.2f} | {row['tflops']:.4g} | "
        f"{_fmt(row.get('rel_err_vs_chunked'), '.1e')} |"))
  lines += ["", "Train step, one device:", "",
            "| preset | L | T | kernel | remat | compile s | step ms | tokens/s | TFLOP/s | "
            "MFU % | "
            "memory_stats peak GiB | XLA plan GiB | estimate GiB |", "|---" * 13 + "|"]
  for row in by("train_step"):
    s = row["setup"]
    peak = (row.get("memory_stats") or {}).get("peak_bytes_in_use")
    lines.append(
        f"| {s['preset']} | {row['num_layers']} | {row['seq_len']:,} | {s['kernel']} | "
        f"{s['remat']} | {row['compile_s']:.1f} | {_fmt(row.get('step_s'), ',.1f', 1e3)} | "
        f"{_fmt(row.get('tokens_per_s_per_device'), ',.0f')} | "
        f"{_fmt(row.get('tflops_per_device'), '.4g')} | {_fmt(row.get('mfu'), '.1f', 100)} | "
        f"{_gib(peak)} | {_gib(row['peak_estimate_bytes'])} | {_gib(row['estimate_bytes'])} |")
  lines += ["", "Ring overhead, n blocks + merge vs one fused call:", "",
            "| kernel | T | n blocks | ms | fused ms | overhead |", "|---|---|---|---|---|---|"]
  for row in by("ring_overhead"):
    lines.append(f"| {row['kernel']} | {row['seq_len']:,} | {row['blocks']} | "
                 f"{row['seconds'] * 1e3:.2f} | {row['fused_seconds'] * 1e3:.2f} | "
                 f"{100 * row['overhead']:+.1f}% |")
  lines += ["", "Longest sequence that trains on one device:", "",
            "| T | trains | step s | memory_stats peak GiB | note |", "|---|---|---|---|---|"]
  for row in by("longest"):
    if "longest_trained" in row:
      longest = row["longest_trained"]
      lines.append(f"| **{longest:,}** | longest that trained | | | " + (
          f"{row['first_failed']:,} did not" if row["first_failed"] else
          "nothing longer was tried within budget: a lower bound") + " |"
          if longest else f"| - | none trained | | | |")
    elif "seq_len" in row:
      peak = (row.get("memory_stats") or {}).get("peak_bytes_in_use")
      lines.append(f"| {row['seq_len']:,} | {'yes' if row['trains'] else 'no'} | "
                   f"{_fmt(row.get('step_s'), '.2f')} | {_gib(peak)} | {row.get('error') or ''} |")
    else:
      lines.append(f"| {row.get('candidate', '-')} | | | | " + (
          row.get("skipped") or f"candidate by the estimate ({_gib(row['estimate_bytes'])} GiB "
                                f"of {_gib(row['limit_bytes'])} GiB)") + " |")
  return "\n".join(lines) + "\n"
