// Drive the web pack's page in Debian's chromium (headless, through puppeteer-core: no browser
// download), as tests/test_pack_web.py does.
//
//   node js/browser.mjs '{"url": "http://127.0.0.1:8000/", "chromium": "/usr/bin/chromium",
//                         "requests": [{"image": "scene-0.png", "task": "<OD>", "text": ""}],
//                         "max_new_tokens": 64, "ui": {"image": "/abs/scene-0.png", "task": "<OD>"}}'
//
// Image paths in `requests` are URLs relative to the page. Prints one JSON line: {isolated,
// threads, load_seconds, results: [page.run results], ui: {status, answer, canvas}, errors:
// [page errors and failed requests]}.
import puppeteer from 'puppeteer-core';

const job = JSON.parse(process.argv[2]);
const browser = await puppeteer.launch({
    executablePath: job.chromium,
    headless: true,
    args: [
        '--no-sandbox', // root in a container: chromium's sandbox needs user namespaces
        '--disable-gpu',
        '--disable-dev-shm-usage',
        '--disable-background-networking', // no update checks, no safe-browsing lists: loopback only
        '--disable-component-update',
        '--disable-default-apps',
        '--disable-sync',
        '--no-first-run',
    ],
});
const output = { errors: [] };
try {
    const page = await browser.newPage();
    page.on('pageerror', (error) => output.errors.push(`page error: ${error.message}`));
    page.on('console', (message) => {
        if (['error', 'warn'].includes(message.type())) output.errors.push(`console ${message.type()}: ${message.text()}`);
    });
    page.on('requestfailed', (request) => output.errors.push(`request failed: ${request.url()}`));
    page.on('response', (response) => {
        if (response.status() >= 400) output.errors.push(`${response.status()}: ${response.url()}`);
        const url = response.url();
        if (!url.startsWith(new URL(job.url).origin) && !/^(blob|data):/.test(url)) output.errors.push(`remote: ${url}`);
    });
    page.setDefaultTimeout(job.timeout_ms ?? 240000);
    await page.goto(job.url, { waitUntil: 'load' });
    await page.waitForFunction(() => window.flonnx !== undefined);
    await page.evaluate(() => window.flonnx.ready).catch((error) => {
        output.errors.push(`not loaded: ${error.message}`);
    });
    if (output.errors.length) {
        process.stdout.write(JSON.stringify(output) + '\n');
        await browser.close();
        process.exit(1);
    }
    Object.assign(
        output,
        await page.evaluate(async () => ({
            isolated: crossOriginIsolated,
            load_seconds: (await window.flonnx.load('wasm')).seconds,
        })),
    );
    output.results = await page.evaluate(async ({ requests, max_new_tokens }) => {
        const results = [];
        for (const { image, task, text } of requests) {
            try {
                results.push(await window.flonnx.run(image, task, text, { max_new_tokens, num_beams: 1 }));
            } catch (error) {
                results.push({ task, error: `run failed: ${error.message}` });
            }
        }
        return results;
    }, job);
    if (job.ui) {
        // as a person would: choose a file and a task, press Run, read what the page shows
        await (await page.$('#image')).uploadFile(job.ui.image);
        await page.select('#task', job.ui.task);
        await page.$eval('#max-new-tokens', (input, value) => (input.value = String(value)), job.max_new_tokens);
        if (job.ui.text) await page.type('#text', job.ui.text);
        const before = await page.$eval('#status', (element) => element.textContent);
        await page.click('#run');
        await page.waitForFunction(
            (previous) => {
                const status = document.getElementById('status');
                return status.textContent !== previous && !status.textContent.startsWith('Running');
            },
            {},
            before,
        );
        output.ui = await page.evaluate(() => {
            const canvas = document.getElementById('canvas');
            const pixels = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
            // count pixels of the first box colour (#e6194b), which only a drawn box has
            let drawn = 0;
            for (let i = 0; i < pixels.length; i += 4) {
                if (pixels[i] === 0xe6 && pixels[i + 1] === 0x19 && pixels[i + 2] === 0x4b) drawn++;
            }
            return {
                status: document.getElementById('status').textContent,
                error: document.getElementById('status').className === 'error',
                answer: document.getElementById('answer').textContent,
                canvas: { width: canvas.width, height: canvas.height, box_pixels: drawn },
            };
        });
    }
    output.threads = await page.evaluate(() => window.flonnx.threads?.());
} finally {
    await browser.close();
}
process.stdout.write(JSON.stringify(output) + '\n');
