// transformers.js as a peer in `flonnx bench`: a worker that loads one Florence-2 folder once and
// answers timed requests, one JSON object per line.
//
//   node js/bench.mjs '{"folder": "cache/base-community", "dtype": "q8", "threads": 2}'
//   -> {"ready": true, "load_s": 1.9}
//   stdin  {"image": "image.png", "task": "<OD>", "new_tokens": 128}
//   stdout {"ids": [2, 0, ...], "seconds": 6.01}      or {"error": "..."}
//
// Each request is what a user's call does with an image already in memory: the processor, greedy
// generate with a forced length (min_new_tokens = max_new_tokens, as the other sides of the bench),
// batch_decode and post_process_generation; the clock covers all of it. Images are read once.
// The worker exits when stdin closes.
import path from 'node:path';
import readline from 'node:readline';
import {
    AutoProcessor,
    env,
    Florence2ForConditionalGeneration,
    RawImage,
} from '@huggingface/transformers';

env.allowLocalModels = true;
env.allowRemoteModels = false;

const { folder, dtype = 'fp32', threads } = JSON.parse(process.argv[2] ?? '{}');
if (!folder) throw new Error('usage: node bench.mjs \'{"folder": ..., "dtype": ..., "threads": ...}\'');

const started = performance.now();
const session_options = threads ? { intraOpNumThreads: threads, interOpNumThreads: 1 } : undefined;
const model_id = path.resolve(folder); // absolute: read as it is, not under env.localModelPath
const processor = await AutoProcessor.from_pretrained(model_id);
const model = await Florence2ForConditionalGeneration.from_pretrained(model_id, { dtype, session_options });
const images = new Map();
const reply = (message) => process.stdout.write(JSON.stringify(message) + '\n');
reply({ ready: true, load_s: (performance.now() - started) / 1000 });

async function answer({ image: file, task, new_tokens }) {
    if (!images.has(file)) images.set(file, await RawImage.read(path.resolve(file)));
    const image = images.get(file);
    const begin = performance.now();
    const inputs = await processor(image, processor.construct_prompts(task));
    const generated_ids = await model.generate({
        ...inputs,
        max_new_tokens: new_tokens,
        min_new_tokens: new_tokens,
        num_beams: 1,
        do_sample: false,
    });
    const text = processor.batch_decode(generated_ids, { skip_special_tokens: false })[0];
    processor.post_process_generation(text, task, image.size); // throws on polygon tasks: none here
    const seconds = (performance.now() - begin) / 1000;
    return { ids: Array.from(generated_ids.tolist()[0], Number), seconds };
}

for await (const line of readline.createInterface({ input: process.stdin })) {
    if (!line.trim()) continue;
    try {
        reply(await answer(JSON.parse(line)));
    } catch (error) {
        reply({ error: String(error?.stack ?? error) });
    }
}
await model.dispose();
