// flonnx web pack: Florence-2 in the browser with transformers.js, loaded from this folder only.
//
// The model folder (model/) says in its config.json which graphs and data files transformers.js
// loads (`transformers.js_config`). Scripts use `window.flonnx`: `await flonnx.run(image, task,
// text, {max_new_tokens, num_beams})` with an image URL, Blob or RawImage returns
// {task, text, ids, answer, error, seconds}; `answer` is what post_process_generation returns
// (transformers.js gives bin-centre float coordinates and throws on polygons: then `error`).
import { AutoProcessor, env, Florence2ForConditionalGeneration, RawImage } from './lib/transformers.min.js';

const here = (path) => new URL(path, import.meta.url).href;
env.allowLocalModels = true;
env.allowRemoteModels = false;
env.useBrowserCache = false; // a re-packed folder must never be shadowed by an older cached copy
// a path, not a URL: transformers.js checks local files only at paths (a URL counts as remote)
env.localModelPath = new URL('./', import.meta.url).pathname;
env.backends.onnx.wasm.wasmPaths = {
    mjs: here('./lib/ort-wasm-simd-threaded.asyncify.mjs'),
    wasm: here('./lib/ort-wasm-simd-threaded.asyncify.wasm'),
};

const MODEL = 'model';
const COLOURS = ['#e6194b', '#3cb44b', '#4363d8', '#f58231', '#911eb4', '#42d4f4', '#f032e6', '#9a6324'];
const loading = new Map(); // device -> Promise<{processor, model}>

// The task tokens of the model's preprocessor_config.json, those without input first.
const tasks = (processor) => [...processor.task_prompts_without_inputs.keys(), ...processor.task_prompts_with_input.keys()];

function load(device = 'wasm') {
    if (!loading.has(device)) {
        loading.set(
            device,
            (async () => {
                const started = performance.now();
                const progress_callback = (event) => {
                    if (event.status === 'progress' && event.total) {
                        status(`Loading ${event.file}: ${Math.round((100 * event.loaded) / event.total)}%`);
                    }
                };
                const processor = await AutoProcessor.from_pretrained(MODEL);
                const model = await Florence2ForConditionalGeneration.from_pretrained(MODEL, {
                    device,
                    progress_callback,
                });
                return { processor, model, seconds: (performance.now() - started) / 1000 };
            })(),
        );
    }
    return loading.get(device);
}

async function run(image, task, text = '', options = {}) {
    const { device = 'wasm', max_new_tokens = 1024, num_beams } = options;
    const { processor, model } = await load(device);
    if (!tasks(processor).includes(task)) {
        throw new Error(`unknown task ${JSON.stringify(task)}; expected one of: ${tasks(processor).join(', ')}`);
    }
    const started = performance.now();
    const raw = await RawImage.read(image);
    const inputs = await processor(raw, processor.construct_prompts(task + text));
    const generated = await model.generate({
        ...inputs,
        max_new_tokens,
        do_sample: false,
        ...(num_beams ? { num_beams } : {}),
    });
    const generatedText = processor.batch_decode(generated, { skip_special_tokens: false })[0];
    const result = { task, text: generatedText, ids: Array.from(generated.tolist()[0], Number) };
    try {
        result.answer = processor.post_process_generation(generatedText, task, raw.size)[task];
    } catch (error) {
        result.error = error.message;
    }
    result.seconds = (performance.now() - started) / 1000;
    result.size = raw.size;
    return result;
}

// -- the page --------------------------------------------------------------------------------

const $ = (id) => document.getElementById(id);

function status(message, error = false) {
    $('status').textContent = message;
    $('status').className = error ? 'error' : '';
}

function draw(bitmap, answer) {
    const canvas = $('canvas');
    canvas.width = bitmap.width;
    canvas.height = bitmap.height;
    const context = canvas.getContext('2d');
    context.drawImage(bitmap, 0, 0);
    if (!answer || typeof answer !== 'object') return;
    context.lineWidth = Math.max(2, Math.round(bitmap.width / 300));
    context.font = `${Math.max(12, Math.round(bitmap.width / 45))}px sans-serif`;
    const label = (text, x, y, colour) => {
        if (!text) return;
        const width = context.measureText(text).width + 6;
        const height = parseInt(context.font, 10) + 4;
        context.fillStyle = colour;
        context.fillRect(x, Math.max(0, y - height), width, height);
        context.fillStyle = '#fff';
        context.fillText(text, x + 3, Math.max(height - 4, y - 4));
    };
    const shapes = [];
    const labels = answer.labels ?? answer.bboxes_labels ?? [];
    for (const [i, box] of (answer.bboxes ?? []).entries()) {
        const [x1, y1, x2, y2] = box;
        shapes.push({ points: [x1, y1, x2, y1, x2, y2, x1, y2], label: labels[i] });
    }
    for (const [i, quad] of (answer.quad_boxes ?? []).entries()) shapes.push({ points: quad, label: labels[i] });
    for (const [i, polygons] of (answer.polygons ?? []).entries()) {
        for (const points of polygons) shapes.push({ points, label: (answer.polygons_labels ?? labels)[i] });
    }
    for (const [i, { points, label: text }] of shapes.entries()) {
        const colour = COLOURS[i % COLOURS.length];
        context.strokeStyle = colour;
        context.beginPath();
        for (let j = 0; j < points.length; j += 2) context[j ? 'lineTo' : 'moveTo'](points[j], points[j + 1]);
        context.closePath();
        context.stroke();
        label(text, points[0], points[1], colour);
    }
}

async function submit(event) {
    event.preventDefault();
    const file = $('image').files[0];
    if (!file) return status('Choose an image first.', true);
    const task = $('task').value;
    const maxNewTokens = Number($('max-new-tokens').value);
    if (!Number.isInteger(maxNewTokens) || maxNewTokens < 1 || maxNewTokens > 1024) {
        return status(`Max new tokens must be a whole number from 1 to 1024, not ${$('max-new-tokens').value}.`, true);
    }
    $('run').disabled = true;
    status(`Running ${task}…`);
    try {
        const result = await run(file, task, $('text').disabled ? '' : $('text').value, {
            device: $('device').value,
            max_new_tokens: maxNewTokens,
        });
        draw(await createImageBitmap(file), result.answer);
        $('answer').textContent = JSON.stringify(result.answer ?? { text: result.text, error: result.error }, null, 2);
        status(`${task}: ${result.ids.length} tokens in ${result.seconds.toFixed(2)} s` +
            (result.error ? ` (post-processing: ${result.error})` : ''));
    } catch (error) {
        status(String(error.message ?? error), true);
    } finally {
        $('run').disabled = false;
    }
}

async function start() {
    if (navigator.gpu) $('device').add(new Option('WebGPU', 'webgpu'));
    try {
        const { processor, seconds } = await load('wasm');
        const withInput = new Set(processor.task_prompts_with_input.keys());
        for (const task of tasks(processor)) {
            $('task').add(new Option(task, task));
        }
        const update = () => ($('text').disabled = !withInput.has($('task').value));
        $('task').addEventListener('change', update);
        update();
        $('form').addEventListener('submit', submit);
        $('run').disabled = false;
        const threads = env.backends.onnx.wasm.numThreads;
        status(`Model loaded in ${seconds.toFixed(1)} s` +
            (crossOriginIsolated ? `; ${threads ?? 'several'} threads` : '; one thread (serve with COOP/COEP headers for more)'));
    } catch (error) {
        status(`The model did not load: ${error.message ?? error}`, true);
        throw error;
    }
}

window.flonnx = { load, run, ready: start(), threads: () => env.backends.onnx.wasm.numThreads };
