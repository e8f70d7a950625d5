"""The bench's report as markdown, and issue 16's targets checked against it.

`targets(report)` reads only the report dict (what `run_bench` returns and the JSON file holds),
so a report from another machine, or one written by hand, is checked the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

PEER_ORDER = ("pytorch_bf16", "tjs_community_q8", "tjs_fp32", "tjs_int8")
PROFILE_TARGETS = (
    # (what, the flonnx variant, against: "torch" or a peer key, rule, goal)
    ("flonnx fp32 vs PyTorch fp32", "fp32", "torch", ">=", 1.4),
    ("flonnx int8 vs PyTorch fp32", "int8", "torch", ">=", 4.0),
    ("flonnx int8 vs PyTorch bf16", "int8", "pytorch_bf16", ">=", 2.0),
    ("flonnx int8 vs transformers.js on community q8", "int8", "tjs_community_q8", ">=", 3.0),
)
PEER_SKIPS = {"pytorch_bf16": "PyTorch bf16", "tjs_community_q8": "transformers.js"}
PEAK_RSS_MB = 600
COLD_START_S = 1.0


def _target(what: str, measured: float | None, rule: str, goal: float, unit: str, why: str = "") -> dict:
    if measured is None:
        met = None
    else:
        met = measured >= goal if rule == ">=" else measured <= goal
    return {
        "target": what,
        "measured": measured,
        "rule": rule,
        "goal": goal,
        "unit": unit,
        "met": met,
        "why": why,
    }


def _get(tree: dict, *keys):
    for key in keys:
        if not isinstance(tree, dict) or tree.get(key) is None:
            return None
        tree = tree[key]
    return tree


def targets(report: dict) -> list[dict]:
    """One row per issue-16 target: the measured value, the goal, and met (True/False; None where
    this run did not measure it, with the reason in `why`)."""
    rows = []
    for name in ("caption", "detection"):
        profile = report.get("profiles", {}).get(name)
        for what, variant, against, rule, goal in PROFILE_TARGETS:
            ours = _get(profile or {}, "flonnx", variant, "end_to_end", "median")
            if against == "torch":
                theirs = _get(profile or {}, "torch", "median")
            else:
                theirs = _get(profile or {}, "peers", against, "end_to_end", "median")
            measured = theirs / ours if ours and theirs else None
            why = ""
            if profile is None:
                why = f"profile {name} not run"
            elif not ours:
                why = f"flonnx {variant} not timed"
            elif not theirs:
                skipped = report.get("skipped", {}).get(PEER_SKIPS.get(against, ""))
                why = skipped or f"{against} not timed"
            rows.append(_target(f"{name}: {what}", measured, rule, goal, "x", why))
    measures = (
        # (what, where in the report, goal: at most this many times the floor)
        ("vision encoder int8 / its int8 GEMM floor", ("floors", "vision", "int8", "over_floor"), 3.0),
        ("vision encoder fp32 / its sgemm floor", ("floors", "vision", "fp32", "over_floor"), 1.3),
        (
            "int8 decode step / its floor with the K/V it reads",
            ("floors", "decode_step", "int8", "over_floor_with_cache"),
            1.2,
        ),
    )
    for what, keys, goal in measures:
        over = _get(report, *keys)
        rows.append(_target(what, over, "<=", goal, "x", "" if over is not None else "not measured"))
    peak = _get(report, "runtime", "int8", "peak_rss_bytes")
    peak_mb = peak / 1e6 if peak is not None else None
    why = "" if peak is not None else "not measured"
    rows.append(
        _target("int8 peak RSS (fresh process: load + two captions)", peak_mb, "<=", PEAK_RSS_MB, " MB", why)
    )
    cold = _get(report, "runtime", "int8", "cold_start_s")
    why = "" if cold is not None else "not measured"
    rows.append(_target("int8 cold start", cold, "<=", COLD_START_S, " s", why))
    return rows


def _number(value: float, unit: str) -> str:
    if unit == "x":
        return f"{value:.2f}x"
    if unit == " MB":
        return f"{value:.0f} MB"
    return f"{value:.2f}{unit}"


def _seconds(summary: dict) -> str:
    if len(summary.get("runs", [])) > 1:
        return f"{summary['median']:.2f} ({summary['min']:.2f}-{summary['max']:.2f})"
    return f"{summary['median']:.2f}"


def _tokens(parity: dict | None) -> str:
    if parity is None:
        return ""
    return "equal" if parity["equal"] else f"{parity['agreement']:.0%} agree"


def _yes(value) -> str:
    return "yes" if value else "no"


def _profile_table(name: str, profile: dict) -> list[str]:
    torch = profile["torch"]
    lines = [
        f"### {name}: `{profile['task']}`, {profile['new_tokens']} new tokens "
        f"({profile['encoder_tokens']} encoder tokens)",
        "",
        "| runtime | end-to-end s | vs PyTorch fp32 | tokens/s | tokens vs PyTorch fp32 "
        "| vision s | encoder s | first step ms | step ms |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| PyTorch fp32 | {_seconds(torch)} | 1.00x | {profile['new_tokens'] / torch['median']:.1f} "
        "| (reference) | | | | |",
    ]
    peers = profile.get("peers", {})
    for key in sorted(peers, key=lambda k: PEER_ORDER.index(k) if k in PEER_ORDER else len(PEER_ORDER)):
        row = peers[key]
        lines.append(
            f"| {row['label']} | {_seconds(row['end_to_end'])} | {row['speedup_vs_torch']:.2f}x "
            f"| {row['tokens_per_s']:.1f} | {_tokens(row.get('parity'))} | | | | |"
        )
    for variant, row in profile["flonnx"].items():
        s = row["stages"]
        cells = [
            f"flonnx {variant}",
            _seconds(row["end_to_end"]),
            f"{row['speedup_vs_torch']:.2f}x",
            f"{row['tokens_per_s']:.1f}",
            _tokens(profile["parity"].get(variant)),
            f"{s['vision']:.2f}",
            f"{s['encoder']:.2f}",
            f"{1000 * s['first_step']:.1f}",
            f"{1000 * s['step']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _targets_table(rows: list[dict]) -> list[str]:
    lines = ["### Targets (issue 16)", "", "| target | measured | goal | result |", "|---|---|---|---|"]
    for row in rows:
        measured = _number(row["measured"], row["unit"]) if row["measured"] is not None else "-"
        result = {True: "met", False: "**missed**", None: f"not measured ({row['why']})"}[row["met"]]
        lines.append(
            f"| {row['target']} | {measured} | {row['rule']} {_number(row['goal'], row['unit'])} | {result} |"
        )
    met = [row["met"] for row in rows if row["met"] is not None]
    return lines + ["", f"{sum(met)} of {len(met)} measured targets met.", ""]


def _rate_runs(floors: dict) -> str:
    runs = floors.get("runs", [])
    if len(runs) < 2:
        return ""
    sgemm = ", ".join(f"{rates['sgemm_gflops']:.0f}" for rates in runs)
    int8 = ", ".join(f"{rates['int8_gemm_gops']:.0f}" for rates in runs)
    memory = ", ".join(f"{rates['memory_gb_s']:.1f}" for rates in runs)
    return f" Best of {len(runs)} measurements (before and after the timings): {sgemm}; {int8}; {memory}."


def _floors(report: dict) -> list[str]:
    floors = report["floors"]
    lines = [
        "### Floors (measured in this run)",
        "",
        f"sgemm (onnxruntime MatMul, 2048^3, constant B) {floors['sgemm_gflops']:.0f} GFLOP/s; "
        f"int8 GEMM (the same MatMul, dynamic int8) {floors['int8_gemm_gops']:.0f} GOP/s "
        f"({floors['int8_gemm_gops'] / floors['sgemm_gflops']:.1f}x sgemm); "
        f"memory bandwidth (copy, read + write) {floors['memory_gb_s']:.1f} GB/s." + _rate_runs(floors),
        "",
        "| vision encoder | GFLOP as int8 GEMMs | GFLOP in fp32 | floor s | measured s | / floor |",
        "|---|---|---|---|---|---|",
    ]
    for variant, row in floors.get("vision", {}).items():
        measured = f"{row['measured_s']:.2f}" if row["measured_s"] else "-"
        over = f"{row['over_floor']:.2f}x" if row["over_floor"] else "-"
        lines.append(
            f"| {variant} | {row['integer_gflop']:.1f} | {row['float_gflop']:.1f} | {row['floor_s']:.2f} "
            f"| {measured} | {over} |"
        )
    if "torch_vision" in report:
        lines += ["", f"PyTorch fp32 vision encoder alone: {report['torch_vision']['median']:.2f} s."]
    lines += [
        "",
        "| decode step | weights MB | floor ms | + K/V MB | floor with K/V ms | measured ms | / floor "
        "| / floor with K/V |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for variant, row in floors.get("decode_step", {}).items():
        measured = row["measured_s"]
        lines.append(
            f"| {variant} | {row['weight_bytes'] / 1e6:.0f} | {1000 * row['floor_s']:.1f} "
            f"| {row['cache_bytes'] / 1e6:.0f} | {1000 * row['floor_with_cache_s']:.1f} "
            f"| {1000 * measured:.1f} | {row['over_floor']:.2f}x | {row['over_floor_with_cache']:.2f}x |"
            if measured
            else f"| {variant} | {row['weight_bytes'] / 1e6:.0f} | {1000 * row['floor_s']:.1f} "
            f"| {row['cache_bytes'] / 1e6:.0f} | {1000 * row['floor_with_cache_s']:.1f} | - | - | - |"
        )
    return lines + [""]


def markdown(report: dict) -> str:
    machine = report["machine"]
    runs = "run" if report["repeats"] == 1 else "runs"
    lines = [
        f"flonnx bench: `{report['size']}` random weights, {machine['threads']} threads, "
        f"medians of {report['repeats']} {runs} (min-max in brackets)",
        "",
        f"Machine: {machine.get('cpu', machine.get('processor'))}, {machine['cpus']} CPUs "
        f"(avx512_vnni {_yes(machine.get('avx512_vnni'))}, avx512_bf16 {_yes(machine.get('avx512_bf16'))}, "
        f"AMX {_yes(machine.get('amx'))}); {machine['platform']}; Python {machine['python']}.",
    ]
    for what, why in report.get("skipped", {}).items():
        lines.append(f"Not timed: {what} ({why}).")
    lines.append("")
    for name, profile in report["profiles"].items():
        lines += _profile_table(name, profile)
    lines += _targets_table(report.get("targets") or targets(report))
    if "runtime" in report:
        lines += [
            "### Memory and cold start (a fresh process: load the variant, run two captions)",
            "",
            "| variant | bundle MB | peak RSS MB | RSS / bundle | process before load MB | cold start s |",
            "|---|---|---|---|---|---|",
        ]
        for variant, row in report["runtime"].items():
            lines.append(
                f"| {variant} | {row['bundle_bytes'] / 1e6:.0f} | {row['peak_rss_bytes'] / 1e6:.0f} | "
                f"{row['rss_over_bundle']:.2f} | {row['runtime_import_rss_bytes'] / 1e6:.0f} | "
                f"{row['cold_start_s']:.2f} |"
            )
        lines.append("")
    if "floors" in report:
        lines += _floors(report)
    if "beam" in report:
        lines += [
            "### Beam search against greedy (detection)",
            "",
            "| variant | greedy s | beam s | cost |",
            "|---|---|---|---|",
        ]
        for variant, row in report["beam"].items():
            lines.append(
                f"| {variant} (num_beams={row.get('beams', 3)}) | {row['greedy']['median']:.2f} "
                f"| {row['beam']['median']:.2f} | {row['cost']:.2f}x |"
            )
        lines.append("")
    if "server" in report:
        batches = sorted({int(b) for rows in report["server"].values() for b in rows})
        lines += [
            "### Server profile (detection, images/s at batch size)",
            "",
            "| variant | " + " | ".join(f"batch {b}" for b in batches) + " |",
            "|---|" + "---|" * len(batches),
        ]
        for variant, rows in report["server"].items():
            cells = [f"{rows[str(b)]['images_per_s']:.2f}" if str(b) in rows else "-" for b in batches]
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def write_report(report: dict, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"bench-{report['size']}.json", out / f"bench-{report['size']}.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(markdown(report))
    return json_path, md_path
