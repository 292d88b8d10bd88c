"""Write ``bench.json`` and the benchmark table block of ``experiments/README.md`` (only between its markers)."""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch

from experiments.bench.common import BenchResult, fmt

__all__ = ["README_END", "README_START", "device_name", "merge_json", "render_block", "write_readme_block"]

README_START = "<!-- bench:start -->"
README_END = "<!-- bench:end -->"
_INTRO = """# Experiments

Committed evidence for `lightning_dbq`: performance benchmarks (below) and, as they land, the CIFAR-10 study.
Every number in the tables comes from a committed JSON file under `experiments/results/`, written by the committed
scripts named next to it.
"""

_HEADING = "## Performance benchmarks (`experiments/bench/`, `make bench`)"
_HOW = {
    "P1": "one fwd+bwd+Adam step at w4a4 ({8,6,4,2} model) vs the FP32 model, same batch; median over 3 fresh "
    "processes of the median of interleaved rounds",
    "P2": "Lightning `DBQModule` epochs: bits=[8,6,4,2] vs four bits=[b] runs, CIFAR-10 JPEG subset",
    "P3": "`set_bits` on a `load_int`-ed resnet50 vs one `inference_mode` forward (1x3x224x224)",
    "P4": "`save_int` file size vs FP32 `state_dict` tensor bytes",
    "P5": "time to 5% rel. SE on every layer, extrapolated from measured per-sample time and variance",
    "P6": "`pareto_front_dp` wall-clock, median",
    "P7": "serving latency vs FP32 eager, same batch, 1 thread; frozen PyTorch and ONNX Runtime (`export_onnx`)",
    "P8": "peak extra memory of one training step (fresh process each; CPU: peak RSS with a fixed glibc mmap "
    "threshold; CUDA: max_memory_allocated)",
    "P9": "one FQT training step (quantized gY, simulated in float) vs the QAT step of the same w4a4 model",
}


def device_name() -> str:
    """CPU model name (``/proc/cpuinfo``) or ``platform.processor()``, with the core count."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {name} ({os.cpu_count()} cores, shared)"


def merge_json(path: Path, results: list[BenchResult], explorations: dict[str, Any], quick: bool) -> dict[str, Any]:
    """Update ``path`` with ``results`` (other entries kept: ``--only`` refreshes a subset); atomic write."""
    data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    data.update(
        {
            "device": device_name(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "command": "make bench  (= uv run python -m experiments.bench.run_all)",
        }
    )
    data.setdefault("results", {}).update({r.key: r.to_json() for r in results})
    data["results"] = dict(sorted(data["results"].items()))
    for r in results:
        data["results"][r.key]["quick"] = quick
    if explorations:
        data.setdefault("explorations", {}).update(explorations)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return data


def _value(entry: dict[str, Any]) -> str:
    return f"{fmt(entry['value'])} s" if entry.get("unit") == "s" else f"{fmt(entry['value'])}x"


def _kernels_table(kernels: dict[str, Any]) -> list[str]:
    rows = [
        "",
        "P1 follow-up, the library's fake-quant back-ends (`quant.prepare.kernel`, `lightning_dbq.set_kernel`; no "
        "target; `experiments/bench/p1_kernels.py`): step time / FP32 step, same run. `eager` = composite "
        "reference functions, `fused` = one `autograd.Function` per quantizer (the fallback of the default `auto`), "
        "`compile` = the composite functions under `torch.compile(dynamic=True)` (what `auto` picks where it "
        "compiles). An earlier run than P1's rows (kernel fixes since: see P1 and docs/performance.md).",
        "",
        "| model | batch | eager | fused | compile | LSQ reference | compile warm-up (4 bits) |",
        "|---|---|---|---|---|---|---|",
    ]
    micro = kernels.get("kernels_ms")
    for name, d in kernels.items():
        if name == "kernels_ms":
            continue
        r = d["over_fp32"]
        rows.append(
            f"| {name} | {d['batch']} | {fmt(r['dbq_eager'])}x | {fmt(r['dbq_fused'])}x | {fmt(r['dbq_compile'])}x | "
            f"{fmt(r['lsq'])}x | {fmt(d['compile_warmup_s_4_bits'])} s |"
        )
    if micro:
        rows += ["", "The kernels alone, one forward+backward (ms):", "", "| tensor | eager | fused | compile |"]
        rows.append("|---|---|---|---|")
        rows += [f"| {t} | {fmt(m['eager'])} | {fmt(m['fused'])} | {fmt(m['compile'])} |" for t, m in micro.items()]
    return rows


_P7_COLUMNS = (
    ("switchable_w4a4", "switchable w4a4"), ("frozen_w4a4", "frozen w4a4"),
    ("frozen_compile_w4a4", "frozen + compile"), ("ort_fp32", "ORT FP32"),
    ("onnx_exact_w8a8", "ours exact w8a8"), ("onnx_exact_w4a4", "ours exact w4a4"),
    ("onnx_integer_w8a8", "ours integer w8a8"), ("onnx_integer_w4a4", "ours integer w4a4"),
    ("ort_own_int8", "ORT's own int8"),
)  # fmt: skip


def _serve_table(details: dict[str, Any]) -> list[str]:
    head = "| model | batch | " + " | ".join(t for _, t in _P7_COLUMNS) + " |"
    rows = [
        "",
        "P7 breakdown (`experiments/bench/p7_serve.py`): latency / PyTorch FP32 eager, same batch, same run, 1 thread.",
        "",
        head,
        "|" + "---|" * (len(_P7_COLUMNS) + 2),
    ]
    for model, per_batch in details.items():
        for batch, d in per_batch.items():
            r = d["over_fp32"]
            cells = " | ".join(f"{fmt(r[k])}x" if k in r else "-" for k, _ in _P7_COLUMNS)
            rows.append(f"| {model} | {batch.removeprefix('batch')} | {cells} |")
    return rows


def _fqt_table(details: dict[str, Any]) -> list[str]:
    rows = [
        "",
        f"P9 breakdown, {details['model']} batch {details['batch']} (`experiments/bench/p9_fqt.py`; ms, medians of "
        "interleaved runs; estimators: `torch.profiler` range `dbq.fqt.quantize_grad`):",
        "",
        "| gradients | step / QAT step | step ms | forward ms | backward + Adam ms | estimators ms | estimators share"
        " |",
        "|---|---|---|---|---|---|---|",
    ]
    for v, b in details["breakdown"].items():
        rows.append(
            f"| {v} | {fmt(b['over_qat'])}x | {fmt(b['step_ms'])} | {fmt(b['forward_ms'])} | "
            f"{fmt(b['backward_and_optimizer_ms'])} | {fmt(b['estimators_ms'])} | "
            f"{100 * b['estimators_share_of_step']:.0f} % |"
        )
    return rows


def _brevitas_line(results: dict[str, Any]) -> list[str]:
    """One sentence with Brevitas' P1 / P8 ratios measured beside the default kernel's (or why they are missing)."""
    found, missing = [], ""
    for key, label, field in (("P1_", "step", "brevitas_over_fp32"), ("P8_", "memory", "brevitas_ratio")):
        for k, e in results.items():
            d = e.get("details", {})
            if k.startswith(key) and field in d and not e.get("quick"):
                if d[field] is None:
                    missing = d.get("brevitas_missing", "not installed")
                else:
                    found.append(f"{label} {d['model']} {fmt(d[field])}x (ours {fmt(e['value'])}x)")
    if not found:
        return ["", f"Brevitas (optional `bench` extra): not measured ({missing})."] if missing else []
    src = "`experiments/bench/brevitas_reference.py`"
    return ["", f"Brevitas w4a4 with learned scales ({src}), same processes and layers, over FP32: " + "; ".join(found)
            + "."]  # fmt: skip


def render_block(data: dict[str, Any]) -> str:
    """The markdown table of ``bench.json`` (between the markers)."""
    lines = [
        README_START,
        "Re-run: `make bench` (full; P1 and P8 alone take ~27 min: 14 + 13) or "
        "`uv run python -m experiments.bench.run_all --only P3,P4`; "
        f"`--quick` is a smoke run that writes nothing. Results: `experiments/results/bench.json`; scripts: "
        f"`experiments/bench/`. {data['device']}, torch {data['torch']}, {data['threads']} thread; ratios are "
        "measured within one run (variants interleaved, warm-up, median of repeats).",
        "",
        "| benchmark | measured | target | met | how |",
        "|---|---|---|---|---|",
    ]
    for key, e in data["results"].items():
        how = _HOW.get(key.split("_")[0], "")
        met = "yes" if e["met"] else "**no**"
        quick = " (quick run)" if e.get("quick") else ""
        lines.append(f"| {e['title']}{quick} | {_value(e)} | {e['target']} | {met} | {how} |")
    p1 = {k: e for k, e in data["results"].items() if k.startswith("P1_") and not k.endswith("_fused")}
    if p1:
        refs = ", ".join(
            f"{e['details']['model']} {fmt(e['details']['lsq_reference_over_fp32'])}x" for e in p1.values()
        )
        src = "`experiments/bench/lsq_reference.py`"
        lines += ["", f"P1 reference: the hand-written single-bit LSQ ({src}) step costs {refs} of the FP32 step."]
    lines += _brevitas_line(data["results"])
    warm = [
        f"{e['details']['model']} kernel={e['details']['kernel']} {fmt(e['details']['warm_step_ratio'])}x"
        for k, e in data["results"].items()
        if k.startswith("P8_") and "warm_step_ratio" in e["details"] and not e.get("quick")
    ]
    if warm:
        lines += ["", "P8 without one-off costs (a two-image training step before the measured ones, so the compiled "
                  "kernel's backward graphs are not compiled inside them; same number of fresh processes): "
                  + "; ".join(warm) + "."]  # fmt: skip
    if "P1_kernels" in data.get("explorations", {}):
        lines += _kernels_table(data["explorations"]["P1_kernels"])
    p7 = data["results"].get("P7_frozen_resnet18", {}).get("details")
    if p7 and not data["results"]["P7_frozen_resnet18"].get("quick"):
        lines += _serve_table(p7)
    for key in ("P9_cifar_resnet20", "P9_resnet18"):
        entry = data["results"].get(key)
        if entry and not entry.get("quick"):
            lines += _fqt_table(entry["details"])
    notes = [
        f"- {k}: {e['details'].get('why') or e['details']['note']}"
        for k, e in data["results"].items()
        if "why" in e["details"] or "note" in e["details"]
    ]
    if notes:
        lines += ["", *notes]
    lines.append(README_END)
    return "\n".join(lines)


def write_readme_block(path: Path, data: dict[str, Any]) -> None:
    """Replace the block between the markers (append it, or create the file with a short intro, if missing)."""
    block = render_block(data)
    text = path.read_text() if path.is_file() else _INTRO
    if README_START in text and README_END in text:
        head, rest = text.split(README_START, 1)
        tail = rest.split(README_END, 1)[1]
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + _HEADING + "\n\n" + block + "\n"
    path.write_text(text)
