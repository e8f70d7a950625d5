"""The README.md of a mobile pack: what each file is, the build lines of a reduced onnxruntime for
Android and iOS, what NNAPI and CoreML can take, and the check against the source variant.

The build lines follow onnxruntime's build documentation (build/custom, build/android, build/ios)
and the flags of its `tools/ci_build/build_args.py`: `--minimal_build extended` (ORT format only;
"extended" keeps the runtime partitioning NNAPI and CoreML need), `--include_ops_by_config` with
`--enable_reduced_operator_type_support` (the kernels and types the config names), and the size
options of onnxruntime's own mobile packages (`--disable_ml_ops --disable_exceptions
--disable_rtti`, `MinSizeRel`). The config is tied to the onnxruntime release that wrote the `.ort`
files, so the lines check out that release.
"""

from __future__ import annotations

from .mobile import CONFIG, USABILITY

TITLES = {
    "vision_encoder": "vision encoder: pixels -> image tokens",
    "embed_tokens": "token embeddings of the prompt and of each generated token",
    "encoder_model": "text encoder over image tokens + prompt",
    "decoder_model_merged": "decoder, one step per token (first step and cached steps in one graph)",
}


def build_commands(ort_version: str) -> dict[str, list[str]]:
    """Shell lines per platform, run from an onnxruntime checkout, with PACK set to this folder."""
    reduced = [
        "  --minimal_build extended \\",
        "  --disable_ml_ops --disable_exceptions --disable_rtti \\",
        f'  --include_ops_by_config "$PACK/{CONFIG}" --enable_reduced_operator_type_support \\',
        "  --skip_tests",
    ]
    return {
        "checkout": [
            "git clone --recursive https://github.com/microsoft/onnxruntime",
            f"cd onnxruntime && git checkout v{ort_version}",
        ],
        "android": [
            "./build.sh --config MinSizeRel --parallel \\",
            '  --android --android_sdk_path "$ANDROID_HOME" --android_ndk_path "$ANDROID_NDK_HOME" \\',
            "  --android_abi arm64-v8a --android_api 27 --cmake_generator Ninja \\",
            "  --build_shared_lib --build_java --use_nnapi \\",
            *reduced,
        ],
        "ios": [
            "./build.sh --config MinSizeRel --parallel --use_xcode \\",
            "  --ios --apple_sysroot iphoneos --osx_arch arm64 --apple_deploy_target 16.0 \\",
            "  --build_apple_framework --use_coreml \\",
            *reduced,
        ],
    }


def shared_tables(pack: dict) -> str:
    """The data files two graphs of the source share, named with their size and readers."""
    return ", ".join(
        f"`{table}` ({_mb(item['bytes'])} MB, read by {' and '.join(item['read_by'])})"
        for table, item in pack["shared_tables"].items()
    )


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f}"


def _cell(entry: dict) -> str:
    def nodes(found: dict) -> str:
        return f"{found['supported_nodes']}/{found['nodes']} nodes in {found['partitions']} partitions"

    now = f"{nodes(entry)}: {entry['verdict']}" if entry.get("verdict") else "shapes unknown"
    fixed = entry.get("with_fixed_shapes")
    return f"{now}; fixed: {nodes(fixed)}: {fixed['verdict']}" if fixed else now


def _usability_rows(findings: dict) -> list[str]:
    providers = list(next(iter(findings.values()))["providers"])
    rows = [f"| graph | dynamic dimensions | {' | '.join(providers)} |", "|---" * (len(providers) + 2) + "|"]
    for component, result in findings.items():
        dims = sorted(
            {str(d) for dims in result["dynamic_inputs"].values() for d in dims if isinstance(d, str)}
        )
        cells = [_cell(result["providers"][provider]) for provider in providers]
        rows.append(f"| {component} | {', '.join(dims) or 'none'} | {' | '.join(cells)} |")
    return rows


def render(manifest: dict, findings: dict, name: str) -> str:
    pack = manifest["pack"]
    variant = next(iter(manifest["variants"]))
    entry = manifest["variants"][variant]
    files = manifest["files"]
    sizes = pack["sizes"]
    ort_version = pack["tools"]["onnxruntime"]
    commands = build_commands(ort_version)
    static = pack.get("static") or {}
    flag = " --static" if static else ""
    lines = [
        f"# {name}: Florence-2 for ONNX Runtime Mobile",
        "",
        f"Variant `{variant}` of `{pack['source']['folder']}`, packed by "
        f"`flonnx pack SOURCE --target mobile --variant {variant}{flag}` with onnxruntime {ort_version}: "
        f"{pack['format']}.",
        "",
        "| file | what | MB |",
        "|---|---|---|",
    ]
    for component, item in entry.items():
        lines.append(f"| `{item['file']}` | {TITLES[component]} | {_mb(files[item['file']]['size'])} |")
    lines += [
        f"| `{CONFIG}` | operators and types of the four graphs: input to a reduced build (below) | |",
        f"| `{USABILITY[0]}`, `{USABILITY[1]}` | what NNAPI and CoreML can take of each graph (below) | |",
        "| `tokenizer.json`, `*config.json` | tokenizer, image preprocessing, task prompts, generation | |",
        "| `flonnx.json` | every file's size and sha256; the variant's graphs | |",
        "",
        f"The four graphs: {_mb(sizes['pack_graphs'])} MB; the source variant's files: "
        f"{_mb(sizes['source_variant'])} MB.",
    ]
    if pack["shared_tables"]:
        lines.append(
            f"The ORT format has no external data, so the table the source keeps once for two graphs, "
            f"{shared_tables(pack)}, is stored in both files here: {_mb(pack['duplicated_bytes'])} MB more."
        )
    lines += [
        "",
        "## Run",
        "",
        "With flonnx (desktop, onnxruntime's Python package loads `.ort` files):",
        "",
        "```sh",
        f'flonnx run {name} photo.jpg --task "<OD>" --variant {variant}',
        "```",
        "",
        "```python",
        f'Florence2.load("{name}", variant="{variant}").run("photo.jpg", "<OD>")',
        "```",
        "",
        "In an app: the official onnxruntime-android and onnxruntime-objc/onnxruntime-c packages run these "
        "files as they are; the reduced build below only makes the library smaller. Inputs and outputs of "
        "each graph are listed under `io` in flonnx.json.",
    ]
    if static:
        shapes = "; ".join(
            f"{component}: " + ", ".join(f"`{value}` {dims}" for value, dims in values.items())
            for component, values in static.items()
        )
        lines += [
            "",
            f"Static shapes ({shapes}): the vision encoder takes one image per run, for NPUs and other "
            "static-shape providers. Run one image per request (flonnx's `run_batch` sends all distinct "
            "images of a batch to the vision encoder at once).",
        ]
    lines += [
        "",
        "## A reduced onnxruntime for this pack",
        "",
        f"`{CONFIG}` lists {pack['operators']['operators']} operators "
        f"({', '.join(f'{d}: {len(ops)}' for d, ops in pack['operators']['by_domain'].items())}) with the "
        "types each one uses. A minimal build runs ORT-format files only and compiles only those kernels "
        f"and types. Build from the release that wrote the files (v{ort_version}), with `PACK` set to "
        "this folder:",
        "",
        "```sh",
        *commands["checkout"],
        "```",
        "",
        "Android (arm64-v8a; Android SDK and NDK installed): `libonnxruntime.so` and the Java AAR",
        "",
        "```sh",
        *commands["android"],
        "```",
        "",
        "iOS (device, arm64; macOS with Xcode): `onnxruntime.framework`",
        "",
        "```sh",
        *commands["ios"],
        "```",
        "",
        "For the iOS simulator: `--apple_sysroot iphonesimulator` (with `--osx_arch arm64` or `x86_64`). "
        "CPU only: drop `--use_nnapi` / `--use_coreml` and write `--minimal_build` alone for the smallest "
        "library. Keep contrib operators (no `--disable_contrib_ops`): the graphs use `com.microsoft` "
        "kernels that onnxruntime's optimizer fused in.",
        "",
        "## What NNAPI and CoreML can take",
        "",
        "onnxruntime's mobile usability checker on each ONNX graph after basic optimizations "
        f"(`{USABILITY[1]}` has its full text): nodes a provider can take as the graph is, and if every "
        "shape were fixed. A provider pays off when one or two partitions cover most nodes (verdict YES or "
        "MAYBE); each partition boundary is a copy between CPU and accelerator.",
        "",
        *_usability_rows(findings),
        "",
        "The `.ort` files are optimized in the Fixed style: onnxruntime's CPU fusions (`com.microsoft` "
        "operators) are baked in, and NNAPI and CoreML take few of them. To hand graphs to NNAPI or "
        "CoreML, convert the source graphs with `python -m onnxruntime.tools.convert_onnx_models_to_ort "
        "--optimization_style Runtime` instead.",
    ]
    check = pack.get("check")
    if check:
        vision = check["vision_max_abs_diff"]
        loads = check["load_seconds"]
        lines += [
            "",
            "## Checked",
            "",
            f"Before this folder was written, on the packing machine, against the source variant (tasks "
            f"{', '.join(f'`{task}`' for task in check['tasks'])}; {check['decoding']}):",
            "",
            f"- answers given the same image features: {check['equal']}/{check['total']} equal;",
            f"- vision features against the graph they were converted from, run as an ARM device runs it: "
            f"max abs diff {vision['converted_as_on_arm']:.2g}; against the source graph run so: "
            f"{vision['source_as_on_arm']:.2g}; against the source as flonnx runs it on this machine: "
            f"{vision['source_here']:.2g} (onnxruntime on x86 puts convolutions in its NCHWc layout, which "
            "ARM builds and this pack do not use"
            + ("; fixed shapes let the optimizer fuse more" if static else "")
            + ");",
            f"- end to end on this machine: {check['end_to_end_equal_here']}/{check['total']} answers equal;",
            f"- load: {loads['pack']:.2f} s (source {loads['source']:.2f} s).",
        ]
    return "\n".join(lines) + "\n"
