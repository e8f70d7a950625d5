// The transformers.js Florence-2 example, unchanged, on local model folders.
//
//   node js/florence2.mjs '{"folder": "out", "dtype": "q8", "max_new_tokens": 64,
//                           "requests": [{"image": "a.png", "task": "<OD>"},
//                                        {"image": "a.png", "task": "<CAPTION_TO_PHRASE_GROUNDING>", "text": "a cat"}]}'
//
// The job is argv[2] or, without it, stdin: one job or a list of jobs (each loads its model once).
// Prints one JSON line: per job, per request {task, text, ids, answer} or {task, text, ids, error}
// where post_process_generation throws (transformers.js parses no polygons). Optional job keys:
// `num_beams`, `threads` (intra-op threads), `save_pixel_values` (a folder: each image's
// pixel_values, float32 in C order, go to <image file name>.f32 there).
import fs from 'node:fs';
import path from 'node:path';
import {
    AutoProcessor,
    env,
    Florence2ForConditionalGeneration,
    RawImage,
} from '@huggingface/transformers';

env.allowLocalModels = true;
env.allowRemoteModels = false;

async function readJob() {
    if (process.argv[2]) return JSON.parse(process.argv[2]);
    const chunks = [];
    for await (const chunk of process.stdin) chunks.push(chunk);
    return JSON.parse(Buffer.concat(chunks).toString('utf8'));
}

async function run(job) {
    const { folder, dtype = 'fp32', requests, max_new_tokens = 256, num_beams, threads, save_pixel_values } = job;
    // A model id that looks like a hub id ("out", "a/b") is read under env.localModelPath; an
    // absolute path is read as it is.
    const model_id = path.resolve(folder);
    const session_options = threads ? { intraOpNumThreads: threads, interOpNumThreads: 1 } : undefined;
    const processor = await AutoProcessor.from_pretrained(model_id);
    const model = await Florence2ForConditionalGeneration.from_pretrained(model_id, { dtype, session_options });
    const results = [];
    for (const { image: file, task, text = '' } of requests) {
        const image = await RawImage.read(path.resolve(file));
        const prompts = processor.construct_prompts(task + text);
        const inputs = await processor(image, prompts);
        if (save_pixel_values) {
            const data = inputs.pixel_values.data;
            const saved = path.join(save_pixel_values, `${path.basename(file)}.f32`);
            fs.writeFileSync(saved, new Uint8Array(data.buffer, data.byteOffset, data.byteLength));
        }
        const generated_ids = await model.generate({
            ...inputs,
            max_new_tokens,
            ...(num_beams ? { num_beams } : {}),
        });
        const generated_text = processor.batch_decode(generated_ids, { skip_special_tokens: false })[0];
        const result = { task, text: generated_text, ids: Array.from(generated_ids.tolist()[0], Number) };
        try {
            result.answer = processor.post_process_generation(generated_text, task, image.size)[task];
        } catch (error) {
            result.error = error.message;
        }
        results.push(result);
    }
    await model.dispose();
    return { folder, dtype, results };
}

const job = await readJob();
let output;
if (Array.isArray(job)) {
    output = [];
    for (const one of job) output.push(await run(one));
} else {
    output = await run(job);
}
process.stdout.write(JSON.stringify(output) + '\n');
