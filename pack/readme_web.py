"""The README.md of a web pack: how to open the page, how an app loads the model folder with
transformers.js, what fits in a browser, and the check against the source variant."""

from __future__ import annotations

from .readme import TITLES, _mb, shared_tables
from .web import LIBRARY_DIR, MODEL_DIR


def render(manifest: dict, name: str) -> str:
    pack = manifest["pack"]
    variant = next(iter(manifest["variants"]))
    entry = manifest["variants"][variant]
    sizes = pack["sizes"]
    library = pack["page"]["library"]
    dtypes = pack["transformers_js"]["dtype"]
    dtype = next(iter(set(dtypes.values()))) if len(set(dtypes.values())) == 1 else dtypes
    lines = [
        f"# {name}: Florence-2 in the browser",
        "",
        f"Variant `{variant}` of `{pack['source']['folder']}`, packed by "
        f"`flonnx pack SOURCE --target web --variant {variant}`: a transformers.js model folder "
        f"(`{MODEL_DIR}/`) and a page that runs it offline (`index.html`, `app.js`, with transformers.js "
        f"{library['@huggingface/transformers']} and onnxruntime-web {library['onnxruntime-web']} in "
        f"`{LIBRARY_DIR}/`).",
        "",
        "## Open the page",
        "",
        "```sh",
        f"flonnx pack {name} --serve          # http://127.0.0.1:8000/",
        "```",
        "",
        "It serves this folder on 127.0.0.1 with the headers that let onnxruntime-web use several threads "
        "(`Cross-Origin-Opener-Policy: same-origin`, `Cross-Origin-Embedder-Policy: require-corp`). Any "
        f"static server works (`python3 -m http.server -d {name}`) but without those headers the page "
        "runs on one thread. Opening index.html as a file does not work: browsers do not let a page "
        "fetch files from `file://` URLs.",
        "",
        "Pick an image and a task: the boxes and polygons are drawn on the image and the answer is shown "
        "as JSON. Nothing leaves the page: the model, the library and the WebAssembly runtime are served "
        "from this folder (`env.allowRemoteModels = false`, local `wasmPaths`).",
        "",
        "## In an app",
        "",
        f"`{MODEL_DIR}/` is a transformers.js model folder; its `config.json` names the graphs' dtype and "
        "external-data files (`transformers.js_config`), so the usual Florence-2 code loads it:",
        "",
        "```js",
        "import { env, AutoProcessor, Florence2ForConditionalGeneration } from '@huggingface/transformers';",
        "env.allowRemoteModels = false;",
        "env.localModelPath = '/models/';  // where this folder's model/ is served, as /models/florence2/",
        "const processor = await AutoProcessor.from_pretrained('florence2');",
        "const model = await Florence2ForConditionalGeneration.from_pretrained('florence2');",
        "```",
        "",
        f"(transformers.js dtype {dtype!r}, chosen by config.json.) flonnx runs the same folder: "
        f'`flonnx run {name}/{MODEL_DIR} photo.jpg --task "<OD>" --variant {variant}`.',
        "",
        "| file | what | MB |",
        "|---|---|---|",
    ]
    for component, item in entry.items():
        sized = pack["sizes"]["per_component"][component]
        data = f" + `{item['data'][0]}`" if item.get("data") else ""
        lines.append(
            f"| `{MODEL_DIR}/{item['file']}`{data} | {TITLES[component]} | "
            f"{_mb(sized['graph'] + sized['data'])} |"
        )
    lines += [
        "",
        f"The four graphs and their data: {_mb(sizes['pack_graphs'])} MB; the source variant's files: "
        f"{_mb(sizes['source_variant'])} MB.",
    ]
    if pack["shared_tables"]:
        lines.append(
            "In a browser transformers.js hands each graph its own data file by name, so the table the "
            f"source keeps once for two graphs, {shared_tables(pack)}, is stored with each: "
            f"{_mb(pack['duplicated_bytes'])} MB more."
        )
    lines += [
        "",
        "## Limits",
        "",
        "A browser fetches at most 2 GB in one file, and onnxruntime-web's WebAssembly memory holds 4 GB, "
        "where the weights are copied and the matrix weights prepacked once more. Florence-2 base fits in "
        "every variant; large fits in int8 and int4, not in fp32 (3.1 GB of weights).",
        *(f"\n**Warning**: {warning}" for warning in pack["warnings"]),
    ]
    check = pack.get("check")
    if check:
        lines += [
            "",
            "## Checked",
            "",
            "Before this folder was written, flonnx ran the packed graphs against the source variant "
            f"(tasks {', '.join(f'`{task}`' for task in check['tasks'])} on a synthetic scene; "
            f"{check['decoding']}): {check['equal']}/{check['total']} answers equal, image features max "
            f"abs diff {check['vision_max_abs_diff']:.2g}; load {check['load_seconds']['pack']:.2f} s "
            f"(source {check['load_seconds']['source']:.2f} s).",
        ]
    return "\n".join(lines) + "\n"
