// Browser test of the sdkube web UI.
//
// Starts the real `sdkube serve` with the tiny fixture model, then drives the system Chromium
// (Debian `chromium`, through playwright-core; no browser download) the way a user would:
// Ctrl+Enter generates, progress shows, the image reaches the gallery with its infotext, "send to
// img2img" fills the img2img tab, a painted mask runs an inpainting job, extras and PNG info,
// the queue view and Cancel, gallery pages, embeddings, switching the model, a phone-width
// screen does not scroll sideways, server errors are shown, the ControlNet, Refiner, Hires. fix
// and Extra (variation seed) panels, Tiling, the scripts (X/Y/Z plot, prompt matrix, SD upscale)
// with A1111's positional script_args and their grids, and /docs lists the OpenAPI endpoints. Further servers cover an API key, basic auth, a model that fails to load, a
// model caught mid-download (from a loopback server through a user catalog), and an `api`
// replica of a shared queue (Debian's redis-server) before any worker runs.
//
// Run: `cargo build -p sdkube && node --test tests/ui/ui.test.mjs` (after `npm ci --prefix tests/ui`).
// Env: SDKUBE_BIN (default target/debug/sdkube), CHROMIUM (default /usr/bin/chromium),
// SDKUBE_UI_SCREENSHOTS (default target/ui-test) for the screenshots it saves.

import { after, before, describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const bin = process.env.SDKUBE_BIN || path.join(repo, 'target/debug/sdkube');
const chromiumPath = process.env.CHROMIUM || '/usr/bin/chromium';
const shots = process.env.SDKUBE_UI_SCREENSHOTS || path.join(repo, 'target/ui-test');
const STEP_TIMEOUT = 20_000;

function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/**
 * Starts `sdkube serve` on a free loopback port with the fixture model (or `model`); resolves
 * once `probe` (/readyz: model loaded, /healthz: listening) answers 200.
 */
async function startServer(extraArgs = [], { model = path.join(repo, 'fixtures/sd/sd1'), probe = '/readyz', embeddings = {} } = {}) {
  assert.ok(fs.existsSync(bin), `${bin} is missing: run \`cargo build -p sdkube\` first (or set SDKUBE_BIN)`);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'sdkube-ui-'));
  fs.mkdirSync(path.join(dir, 'embeddings'));
  for (const [name, bytes] of Object.entries(embeddings)) fs.writeFileSync(path.join(dir, 'embeddings', name), bytes);
  const port = await freePort();
  const base = `http://127.0.0.1:${port}`;
  const args = [
    'serve',
    '--model', model,
    '--listen', `127.0.0.1:${port}`,
    '--outputs', path.join(dir, 'outputs'),
    '--store', path.join(dir, 'store'),
    '--embeddings', path.join(dir, 'embeddings'),
    '--device', 'cpu',
    ...extraArgs,
  ];
  const child = spawn(bin, args, { cwd: repo, stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, SDKUBE_LOG: 'warn' } });
  let log = '';
  child.stdout.on('data', (d) => (log += d));
  child.stderr.on('data', (d) => (log += d));
  let exited = null;
  child.on('exit', (code, signal) => (exited = { code, signal }));
  // Never leave a server behind, even when the test process is interrupted.
  process.once('exit', () => exited || child.kill('SIGKILL'));
  const deadline = Date.now() + 60_000;
  for (;;) {
    if (exited) throw new Error(`sdkube serve exited (${JSON.stringify(exited)}) before it was ready:\n${log}`);
    try {
      const res = await fetch(`${base}${probe}`);
      if (res.status === 200) break;
    } catch {
      // not listening yet
    }
    if (Date.now() > deadline) {
      child.kill('SIGKILL');
      throw new Error(`sdkube serve was not ready within 60 s:\n${log}`);
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  const stop = async () => {
    if (!exited) {
      child.kill('SIGTERM');
      await Promise.race([new Promise((r) => child.once('exit', r)), new Promise((r) => setTimeout(r, 5000))]);
      if (!exited) child.kill('SIGKILL');
    }
    fs.rmSync(dir, { recursive: true, force: true });
  };
  return { base, stop, log: () => log };
}

/** Starts the server and the browser side by side; whichever started is stopped if the other failed. */
async function startBoth(extraArgs = [], options = {}) {
  const [server, browser] = await Promise.allSettled([startServer(extraArgs, options), launchBrowser()]);
  if (server.status === 'fulfilled' && browser.status === 'fulfilled') return [server.value, browser.value];
  if (server.status === 'fulfilled') await server.value.stop();
  if (browser.status === 'fulfilled') await browser.value.close();
  throw server.status === 'rejected' ? server.reason : browser.reason;
}

/** A safetensors file of F32 tensors: `{name: {shape, values}}`. */
function safetensors(tensors) {
  const header = {};
  const blobs = [];
  let offset = 0;
  for (const [name, { shape, values }] of Object.entries(tensors)) {
    const data = Buffer.from(new Float32Array(values).buffer);
    header[name] = { dtype: 'F32', shape, data_offsets: [offset, offset + data.length] };
    blobs.push(data);
    offset += data.length;
  }
  let json = JSON.stringify(header);
  json += ' '.repeat((8 - (json.length % 8)) % 8);
  const size = Buffer.alloc(8);
  size.writeBigUInt64LE(BigInt(json.length));
  return Buffer.concat([size, Buffer.from(json), ...blobs]);
}

function launchBrowser() {
  return chromium.launch({
    executablePath: chromiumPath,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking'],
  });
}

/** Fails the test on any uncaught page error or console error the UI produced. */
function watchPage(page, problems) {
  page.on('pageerror', (err) => problems.push(`page error: ${err.message}`));
  page.on('console', (msg) => {
    if (msg.type() === 'error') problems.push(`console error: ${msg.text()}`);
  });
}

/** Counts the black, white and other pixels of a base64 PNG (decoded by the browser). */
function pngPixelClasses(page, base64) {
  return page.evaluate(async (b64) => {
    const image = new Image();
    image.src = `data:image/png;base64,${b64}`;
    await image.decode();
    const canvas = document.createElement('canvas');
    canvas.width = image.naturalWidth;
    canvas.height = image.naturalHeight;
    const ctx = canvas.getContext('2d');
    ctx.drawImage(image, 0, 0);
    const d = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
    let white = 0;
    let black = 0;
    let other = 0;
    for (let i = 0; i < d.length; i += 4) {
      if (d[i] === 255 && d[i + 1] === 255 && d[i + 2] === 255) white += 1;
      else if (d[i] === 0 && d[i + 1] === 0 && d[i + 2] === 0) black += 1;
      else other += 1;
    }
    return { width: canvas.width, height: canvas.height, white, black, other };
  }, base64);
}

/** Clicks Generate; the response to the job it posts. */
async function submitJob(page) {
  const created = page.waitForResponse((r) => r.url().endsWith('/api/v1/jobs') && r.request().method() === 'POST');
  await page.click('#generate');
  return created;
}

/** Generates one image through the UI and waits for it: the params the UI sent, the infotext. */
async function generatedImage(page, base) {
  const response = await submitJob(page);
  assert.equal(response.status(), 202, await response.text());
  const { params } = JSON.parse(response.request().postData());
  const final = await finishedJob(base, (await response.json()).id);
  assert.equal(final.state, 'succeeded', JSON.stringify(final));
  await page.locator('#progress-text', { hasText: /^Done/ }).waitFor();
  return { params, infotext: final.images[0].infotext };
}

/** Polls a job of the native API until it has finished; returns its last state. */
async function finishedJob(base, id) {
  let job;
  for (let i = 0; i < 600; i += 1) {
    job = await (await fetch(`${base}/api/v1/jobs/${id}`)).json();
    if (['succeeded', 'failed', 'cancelled'].includes(job.state)) return job;
    await new Promise((r) => setTimeout(r, 100));
  }
  return job;
}

describe('sdkube web UI in Chromium', { timeout: 120_000 }, () => {
  let server;
  let browser;
  let page;
  const problems = [];
  let firstImage; // {name, url, seed, infotext} of the txt2img result
  let checkpoints;

  before(async () => {
    fs.mkdirSync(shots, { recursive: true });
    // Two textual-inversion embeddings: one of the fixture text encoder's width (8), one too wide.
    const width = JSON.parse(fs.readFileSync(path.join(repo, 'fixtures/sd/sd1/text_encoder/config.json'))).hidden_size;
    const embeddings = {
      'ui-style.safetensors': safetensors({ emb_params: { shape: [2, width], values: Array.from({ length: 2 * width }, (_, i) => i / 10) } }),
      'ui-too-wide.safetensors': safetensors({ emb_params: { shape: [1, width + 1], values: Array(width + 1).fill(0.5) } }),
    };
    // A second checkpoint to switch to: the fixture again, under another name.
    checkpoints = fs.mkdtempSync(path.join(os.tmpdir(), 'sdkube-ui-ckpt-'));
    fs.symlinkSync(path.join(repo, 'fixtures/sd/sd1'), path.join(checkpoints, 'sd1-copy'));
    [server, browser] = await startBoth(
      ['--checkpoint-dirs', checkpoints, '--lora-dirs', path.join(repo, 'fixtures/lora/sd1'), '--controlnet-dirs', path.join(repo, 'fixtures/controlnet')],
      { embeddings },
    );
    const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
    page = await context.newPage();
    page.setDefaultTimeout(STEP_TIMEOUT);
    watchPage(page, problems);
  });

  after(async () => {
    await browser?.close();
    await server?.stop();
    if (checkpoints) fs.rmSync(checkpoints, { recursive: true, force: true });
  });

  it('serves the four files of ui/ as they are in the repository', async () => {
    // The binary embeds them at compile time: a stale build would test an old UI.
    for (const [route, file, type] of [
      ['/', 'index.html', 'text/html'],
      ['/ui/app.js', 'app.js', 'javascript'],
      ['/ui/style.css', 'style.css', 'text/css'],
      ['/docs', 'docs.html', 'text/html'],
    ]) {
      const res = await fetch(`${server.base}${route}`);
      assert.equal(res.status, 200, route);
      assert.ok(res.headers.get('content-type').includes(type), `${route}: ${res.headers.get('content-type')}`);
      const served = await res.text();
      assert.ok(served === fs.readFileSync(path.join(repo, 'ui', file), 'utf8'), `${route} differs from ui/${file}: rebuild with \`cargo build -p sdkube\``);
    }
  });

  it('generates a txt2img image with Ctrl+Enter, showing progress and the image', async () => {
    await page.goto(server.base);
    // Controls are filled from the server's A1111 endpoints.
    await page.waitForFunction(() => document.querySelector('#sampler').options.length > 0 && document.querySelector('#model').options.length > 0);
    assert.equal(await page.locator('#model-banner').isHidden(), true, 'the model is ready: no banner');
    await page.fill('#prompt', 'a lighthouse at dusk');
    await page.fill('#negative-prompt', 'blurry');
    await page.fill('#width', '64');
    await page.fill('#height', '64');
    await page.fill('#steps', '2');
    await page.fill('#seed', '1234');
    // Every text the progress line shows, as the user would see it.
    await page.evaluate(() => {
      window.progressTexts = [];
      const line = document.querySelector('#progress-text');
      new MutationObserver(() => window.progressTexts.push(line.textContent)).observe(line, { childList: true, characterData: true, subtree: true });
    });
    const created = page.waitForResponse((r) => r.url().endsWith('/api/v1/jobs') && r.request().method() === 'POST');
    await page.focus('#prompt');
    await page.keyboard.press('Control+Enter');
    const response = await created;
    assert.equal(response.status(), 202, await response.text());
    const job = await response.json();
    assert.equal(job.kind, 'txt2img');

    const image = page.locator('#results img').first();
    await image.waitFor();
    await page.waitForFunction(() => document.querySelector('#results img').complete && document.querySelector('#results img').naturalWidth > 0);
    assert.equal(await image.evaluate((img) => img.naturalWidth), 64);
    const texts = await page.evaluate(() => window.progressTexts);
    // Two fixture steps may pass between two events: the live state is shown, the steps are
    // checked on the long job of the cancel test.
    assert.ok(texts.some((t) => /^(Queued|Running|Step \d+\/2)/.test(t)), `the job's live state was shown: ${JSON.stringify(texts)}`);
    assert.match(texts.at(-1), /^Done: step 2\/2, 1 image/);
    assert.deepEqual(await page.$eval('#progress', (p) => [p.value, p.max]), [2, 2]);

    const final = await (await fetch(`${server.base}/api/v1/jobs/${job.id}`)).json();
    assert.equal(final.state, 'succeeded');
    assert.equal(final.images.length, 1);
    firstImage = final.images[0];
    assert.equal(firstImage.seed, 1234);
    assert.equal(await image.getAttribute('src'), firstImage.url);
    // ♻ reuses the seed of the last image, 🎲 goes back to random.
    await page.click('#seed-random');
    assert.equal(await page.inputValue('#seed'), '-1');
    await page.click('#seed-reuse');
    assert.equal(await page.inputValue('#seed'), '1234');
    await page.screenshot({ path: path.join(shots, 'txt2img.png'), fullPage: true });
  });

  it('shows the image in the gallery with its infotext', async () => {
    await page.click('.tabs [data-tab="gallery"]');
    const item = page.locator(`#gallery .gallery-item[data-name="${firstImage.name}"]`);
    await item.waitFor();
    assert.equal(await page.locator('#gallery .gallery-item').first().getAttribute('data-name'), firstImage.name, 'newest first');
    await item.click();
    const info = await page.textContent('#gallery-info');
    assert.equal(info.trim(), firstImage.infotext.trim());
    assert.match(info, /a lighthouse at dusk/);
    assert.match(info, /Negative prompt: blurry/);
    assert.match(info, /Steps: 2,/);
    assert.match(info, /Seed: 1234/);
    await page.screenshot({ path: path.join(shots, 'gallery.png'), fullPage: true });
  });

  it('"send to img2img" fills the img2img tab from the image and its infotext', async () => {
    // Start from different values, so that filling them is visible.
    await page.evaluate(() => {
      document.querySelector('#prompt').value = 'something else';
      document.querySelector('#steps').value = '7';
      document.querySelector('#seed').value = '-1';
    });
    await page.click('#gallery-to-img2img');
    await page.locator('#mask-wrap').waitFor();
    assert.equal(await page.getAttribute('.tabs [data-tab="img2img"]', 'aria-selected'), 'true');
    assert.equal(await page.isVisible('#img2img-panel'), true);
    assert.equal(await page.inputValue('#prompt'), 'a lighthouse at dusk');
    assert.equal(await page.inputValue('#negative-prompt'), 'blurry');
    assert.equal(await page.inputValue('#steps'), '2');
    assert.equal(await page.inputValue('#seed'), '1234');
    assert.deepEqual(await page.$eval('#init-canvas', (c) => [c.width, c.height]), [64, 64]);
    // The canvas holds the image's pixels, not a blank.
    const distinct = await page.$eval('#init-canvas', (c) => {
      const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
      return new Set(Array.from({ length: d.length / 4 }, (_, i) => `${d[4 * i]},${d[4 * i + 1]},${d[4 * i + 2]}`)).size;
    });
    assert.ok(distinct > 10, `the init image has content (${distinct} colours)`);
  });

  it('paints a mask stroke and runs an inpainting job with a black/white mask', async () => {
    await page.fill('#brush-size', '8');
    await page.dispatchEvent('#brush-size', 'input');
    const box = await page.locator('#mask-canvas').boundingBox();
    await page.mouse.move(box.x + box.width * 0.25, box.y + box.height * 0.25);
    await page.mouse.down();
    await page.mouse.move(box.x + box.width * 0.75, box.y + box.height * 0.75, { steps: 8 });
    await page.mouse.up();
    await page.fill('#denoising', '0.6');

    const requestSeen = page.waitForRequest((r) => r.url().endsWith('/api/v1/jobs') && r.method() === 'POST');
    const responseSeen = page.waitForResponse((r) => r.url().endsWith('/api/v1/jobs') && r.request().method() === 'POST');
    await page.click('#generate');
    const request = await requestSeen;
    const sent = JSON.parse(request.postData());
    assert.equal(sent.kind, 'img2img');
    assert.equal(sent.params.init_images.length, 1);
    assert.equal(sent.params.denoising_strength, 0.6);
    assert.equal(typeof sent.params.mask, 'string');
    const mask = await pngPixelClasses(page, sent.params.mask);
    assert.equal(mask.width, 64);
    assert.equal(mask.height, 64);
    assert.equal(mask.other, 0, 'the mask is pure black and white');
    assert.ok(mask.white > 20 && mask.black > 20, `the stroke is white on black: ${JSON.stringify(mask)}`);
    // The diagonal stroke: its middle is white, the far corners black.
    const response = await responseSeen;
    assert.equal(response.status(), 202, await response.text());
    const job = await response.json();

    await page.waitForFunction((id) => /^Done/.test(document.querySelector('#progress-text').textContent) || /^(Failed|Cancelled)/.test(document.querySelector('#progress-text').textContent), job.id);
    const final = await (await fetch(`${server.base}/api/v1/jobs/${job.id}`)).json();
    assert.equal(final.state, 'succeeded', final.error || '');
    assert.equal(final.kind, 'img2img');
    const src = await page.getAttribute('#results img', 'src');
    assert.equal(src, final.images[0].url);
    assert.notEqual(src, firstImage.url);
    await page.screenshot({ path: path.join(shots, 'inpaint.png'), fullPage: true });
  });

  it('extras upscales an image sent from the gallery, PNG info reads its infotext', async () => {
    await page.click('.tabs [data-tab="gallery"]');
    await page.click(`#gallery .gallery-item[data-name="${firstImage.name}"]`);
    await page.click('#gallery-to-extras');
    await page.waitForFunction(() => document.querySelector('#extras-input').naturalWidth === 64);
    await page.selectOption('#upscaler', 'Lanczos');
    await page.fill('#upscale-factor', '2');
    await page.selectOption('#face-restorer', '');
    await page.click('#extras-run');
    await page.waitForFunction(() => document.querySelector('#extras-output').naturalWidth > 0);
    assert.deepEqual(await page.$eval('#extras-output', (img) => [img.naturalWidth, img.naturalHeight]), [128, 128]);
    assert.match(await page.textContent('#extras-info'), /Lanczos/);

    // PNG info of the generated file, as a user would upload it.
    const png = Buffer.from(await (await fetch(`${server.base}${firstImage.url}`)).arrayBuffer());
    await page.setInputFiles('#pnginfo-file', { name: firstImage.name, mimeType: 'image/png', buffer: png });
    await page.waitForFunction(() => document.querySelector('#pnginfo-text').textContent.length > 0);
    assert.equal((await page.textContent('#pnginfo-text')).trim(), firstImage.infotext.trim());
  });

  it('shows the server\'s message for a bad parameter', async () => {
    await page.click('.tabs [data-tab="txt2img"]');
    const status = await (await fetch(`${server.base}/api/v1/status`)).json();
    const tooMany = status.limits.max_steps + 1;
    await page.fill('#width', '64');
    await page.fill('#height', '64');
    await page.fill('#steps', String(tooMany));
    await page.click('#generate');
    // The same request straight to the API: the UI must show exactly the server's message.
    const direct = await fetch(`${server.base}/api/v1/jobs`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ kind: 'txt2img', params: { prompt: 'x', steps: tooMany, width: 64, height: 64 } }),
    });
    assert.equal(direct.status, 400);
    const { error } = await direct.json();
    assert.ok(error, 'the server explains the 400');
    await page.locator('#errors .error-text', { hasText: error }).waitFor();
    await page.fill('#steps', '2');
  });

  it('shows step, ETA and preview of a running job; the queue view lists it and Cancel stops it mid-sampling', async () => {
    await page.click('.tabs [data-tab="txt2img"]');
    await page.fill('#width', '64');
    await page.fill('#height', '64');
    // Long enough to be caught running: 8 x 150 steps of the fixture model.
    const steps = (await (await fetch(`${server.base}/api/v1/status`)).json()).limits.max_steps;
    await page.fill('#steps', String(steps));
    await page.fill('#batch-count', '8');
    const created = page.waitForResponse((r) => r.url().endsWith('/api/v1/jobs') && r.request().method() === 'POST');
    await page.click('#generate');
    const job = await (await created).json();
    // Live progress: step, ETA and the preview image of the running job.
    await page.waitForFunction((total) => new RegExp(`^Step [1-9]\\d*/${total} · ETA `).test(document.querySelector('#progress-text').textContent), steps * 8);
    await page.waitForFunction(() => !document.querySelector('#preview').hidden && document.querySelector('#preview').naturalWidth > 0);
    assert.ok((await page.$eval('#progress', (p) => p.value)) >= 1);
    assert.equal(await page.isEnabled('#cancel'), true);

    await page.click('.tabs [data-tab="queue"]');
    const row = page.locator('#queue-table tbody tr', { hasText: job.id.slice(0, 8) });
    await row.waitFor();
    assert.match(await row.textContent(), /running/);
    await row.locator('button', { hasText: 'Cancel' }).click();
    await page.locator('#queue-table tbody tr[data-state="cancelled"]', { hasText: job.id.slice(0, 8) }).waitFor();
    const final = await (await fetch(`${server.base}/api/v1/jobs/${job.id}`)).json();
    assert.equal(final.state, 'cancelled');
    assert.ok(final.step < final.total_steps, `stopped at step ${final.step} of ${final.total_steps}`);
    await page.locator('#progress-text', { hasText: /^Cancelled$/ }).waitFor({ state: 'attached' });
    await page.click('.tabs [data-tab="txt2img"]');
    await page.fill('#batch-count', '1');
    await page.fill('#steps', '2');
  });

  it('the gallery pages through more images than fit on one page', async () => {
    // 24 more images straight through the API (the UI shows 24 per page).
    const res = await fetch(`${server.base}/api/v1/jobs`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ kind: 'txt2img', params: { prompt: 'many', width: 64, height: 64, steps: 1, batch_size: 8, n_iter: 3 } }),
    });
    assert.equal(res.status, 202);
    const { id } = await res.json();
    let job;
    for (let i = 0; i < 200; i += 1) {
      job = await (await fetch(`${server.base}/api/v1/jobs/${id}`)).json();
      if (['succeeded', 'failed', 'cancelled'].includes(job.state)) break;
      await new Promise((r) => setTimeout(r, 100));
    }
    assert.equal(job.state, 'succeeded', job.error || '');
    const { total } = await (await fetch(`${server.base}/api/v1/gallery?page=1&per_page=1`)).json();
    assert.ok(total > 24, `${total} images`);

    await page.click('.tabs [data-tab="gallery"]');
    await page.locator('#gallery-page', { hasText: `Page 1 of ${Math.ceil(total / 24)} · ${total} images` }).waitFor();
    assert.equal(await page.locator('#gallery .gallery-item').count(), 24);
    assert.equal(await page.isDisabled('#gallery-prev'), true);
    await page.click('#gallery-next');
    await page.locator('#gallery-page', { hasText: 'Page 2 of' }).waitFor();
    assert.equal(await page.locator('#gallery .gallery-item').count(), Math.min(24, total - 24));
    // The first image generated is the oldest, so it is on the last page.
    if (total <= 48) assert.equal(await page.locator(`#gallery .gallery-item[data-name="${firstImage.name}"]`).count(), 1);
    await page.click('#gallery-prev');
    await page.locator('#gallery-page', { hasText: 'Page 1 of' }).waitFor();
  });

  it('lists the loaded and the skipped embeddings, and puts one in the prompt', async () => {
    const api = await (await fetch(`${server.base}/sdapi/v1/embeddings`)).json();
    assert.deepEqual(Object.keys(api.loaded), ['ui-style']);
    assert.deepEqual(Object.keys(api.skipped), ['ui-too-wide']);
    await page.click('.tabs [data-tab="txt2img"]');
    await page.fill('#prompt', 'a castle');
    await page.click('.tabs [data-tab="embeddings"]');
    const loaded = page.locator('#embeddings-loaded li', { hasText: 'ui-style' });
    await loaded.waitFor();
    assert.match(await loaded.textContent(), /2 vectors/);
    const skipped = page.locator('#embeddings-skipped li', { hasText: 'ui-too-wide' });
    await skipped.waitFor();
    if (api.skipped['ui-too-wide'].reason) {
      const shown = await skipped.textContent();
      assert.ok(shown.includes(api.skipped['ui-too-wide'].reason), `${shown} / ${api.skipped['ui-too-wide'].reason}`);
    }
    await loaded.locator('button').click();
    assert.equal(await page.getAttribute('.tabs [data-tab="txt2img"]', 'aria-selected'), 'true');
    assert.equal(await page.inputValue('#prompt'), 'a castle, ui-style');
  });

  it('lists the LoRA files; a click puts <lora:name:1> in the prompt, and the image is made with it', async () => {
    const api = await (await fetch(`${server.base}/sdapi/v1/loras`)).json();
    assert.deepEqual(api.map((l) => l.name), ['kohya-sd1', 'loha-sd1', 'lokr-sd1', 'peft-sd1']);
    await page.click('.tabs [data-tab="txt2img"]');
    await page.fill('#prompt', 'a castle');
    await page.fill('#width', '64');
    await page.fill('#height', '64');
    await page.fill('#steps', '2');
    await page.click('.tabs [data-tab="loras"]');
    const item = page.locator('#loras-list li', { hasText: 'kohya-sd1' });
    await item.waitFor();
    assert.match(await item.textContent(), /alias kohya-sd1-alias/);
    await item.locator('button').click();
    assert.equal(await page.getAttribute('.tabs [data-tab="txt2img"]', 'aria-selected'), 'true');
    assert.equal(await page.inputValue('#prompt'), 'a castle <lora:kohya-sd1:1>');
    const created = page.waitForResponse((r) => r.url().endsWith('/api/v1/jobs') && r.request().method() === 'POST');
    await page.click('#generate');
    const response = await created;
    assert.equal(response.status(), 202, await response.text());
    const job = await response.json();
    let final;
    for (let i = 0; i < 600; i++) {
      final = await (await fetch(`${server.base}/api/v1/jobs/${job.id}`)).json();
      if (['succeeded', 'failed', 'cancelled'].includes(final.state)) break;
      await new Promise((r) => setTimeout(r, 100));
    }
    assert.equal(final.state, 'succeeded', JSON.stringify(final));
    assert.match(final.images[0].infotext, /^a castle <lora:kohya-sd1:1>\n/);
    assert.match(final.images[0].infotext, /Lora hashes: "kohya-sd1: 8d2ab056d855"/);
  });

  it('ControlNet panel: lists preprocessors and models, previews the map, and steers the image', async () => {
    await page.click('.tabs [data-tab="txt2img"]');
    await page.fill('#prompt', 'a lighthouse');
    await page.fill('#width', '64');
    await page.fill('#height', '64');
    await page.fill('#steps', '2');
    await page.fill('#seed', '11');
    await page.click('#controlnet-panel summary');
    await page.waitForFunction(() => document.querySelector('#cn-module').options.length > 1);
    const modules = await page.$$eval('#cn-module option', (o) => o.map((x) => x.value));
    assert.ok(modules.includes('canny'), modules.join(', '));
    const models = await page.$$eval('#cn-model option', (o) => o.map((x) => x.value));
    assert.ok(models.some((m) => /^sd1 \[[0-9a-f]{8}\]$/.test(m)), models.join(', '));
    await page.selectOption('#cn-model', models.find((m) => m.startsWith('sd1 [')));
    // A white square on black: canny finds its outline.
    const control = await page.evaluate(() => {
      const c = document.createElement('canvas');
      c.width = 64;
      c.height = 64;
      const g = c.getContext('2d');
      g.fillStyle = '#000';
      g.fillRect(0, 0, 64, 64);
      g.fillStyle = '#fff';
      g.fillRect(16, 16, 32, 32);
      return c.toDataURL('image/png').split(',')[1];
    });
    await page.setInputFiles('#cn-file', { name: 'square.png', mimeType: 'image/png', buffer: Buffer.from(control, 'base64') });
    await page.waitForSelector('#cn-input:not([hidden])');
    await page.selectOption('#cn-module', 'canny');
    await page.click('#cn-preview');
    await page.waitForSelector('#cn-map:not([hidden])');
    const edges = await page.$eval('#cn-map', (img) => {
      const c = document.createElement('canvas');
      c.width = img.naturalWidth;
      c.height = img.naturalHeight;
      const g = c.getContext('2d');
      g.drawImage(img, 0, 0);
      const d = g.getImageData(0, 0, c.width, c.height).data;
      let n = 0;
      for (let i = 0; i < d.length; i += 4) if (d[i] > 128) n++;
      return { n, total: c.width * c.height };
    });
    assert.ok(edges.n > 0 && edges.n < edges.total / 4, JSON.stringify(edges));

    const run = async () => {
      const created = page.waitForResponse((r) => r.url().endsWith('/api/v1/jobs') && r.request().method() === 'POST');
      await page.click('#generate');
      const response = await created;
      assert.equal(response.status(), 202, await response.text());
      const body = JSON.parse(response.request().postData());
      const job = await response.json();
      let final;
      for (let i = 0; i < 600; i++) {
        final = await (await fetch(`${server.base}/api/v1/jobs/${job.id}`)).json();
        if (['succeeded', 'failed', 'cancelled'].includes(final.state)) break;
        await new Promise((r) => setTimeout(r, 100));
      }
      assert.equal(final.state, 'succeeded', JSON.stringify(final));
      return { body, image: await (await fetch(`${server.base}${final.images[0].url}`)).arrayBuffer() };
    };
    const plain = await run();
    assert.equal(plain.body.params.alwayson_scripts, undefined);
    await page.check('#cn-enabled');
    const steered = await run();
    const unit = steered.body.params.alwayson_scripts.controlnet.args[0];
    assert.equal(unit.module, 'canny');
    assert.match(unit.model, /^sd1 \[/);
    assert.notDeepEqual(Buffer.from(steered.image), Buffer.from(plain.image), 'the unit changed the image');
    await page.uncheck('#cn-enabled');
  });

  it('Refiner panel: lists the checkpoints and hands the run to the chosen one', async () => {
    await page.click('.tabs [data-tab="txt2img"]');
    await page.fill('#prompt', 'a lighthouse');
    await page.fill('#width', '64');
    await page.fill('#height', '64');
    await page.fill('#steps', '4');
    await page.fill('#seed', '12');
    await page.click('#refiner-panel summary');
    const options = await page.$$eval('#refiner-checkpoint option', (o) => o.map((x) => x.textContent));
    assert.equal(options[0], 'None');
    assert.ok(options.includes('sd1-copy'), options.join(', '));
    await page.selectOption('#refiner-checkpoint', { label: 'sd1-copy' });
    await page.fill('#refiner-switch-at', '0.5');
    const created = page.waitForResponse((r) => r.url().endsWith('/api/v1/jobs') && r.request().method() === 'POST');
    await page.click('#generate');
    const response = await created;
    assert.equal(response.status(), 202, await response.text());
    const params = JSON.parse(response.request().postData()).params;
    assert.equal(params.refiner_checkpoint, 'sd1-copy');
    assert.equal(params.refiner_switch_at, 0.5);
    const job = await response.json();
    let final;
    for (let i = 0; i < 600; i++) {
      final = await (await fetch(`${server.base}/api/v1/jobs/${job.id}`)).json();
      if (['succeeded', 'failed', 'cancelled'].includes(final.state)) break;
      await new Promise((r) => setTimeout(r, 100));
    }
    assert.equal(final.state, 'succeeded', JSON.stringify(final));
    assert.match(final.images[0].infotext, /Refiner: sd1-copy, Refiner switch at: 0\.5/);
    await page.selectOption('#refiner-checkpoint', '');
  });

  it('Hires. fix panel: upscalers from the server, 64 → 128 with the hires infotext; txt2img only', async () => {
    await page.click('.tabs [data-tab="txt2img"]');
    await page.fill('#prompt', 'a lighthouse');
    await page.fill('#width', '64');
    await page.fill('#height', '64');
    await page.fill('#steps', '2');
    await page.fill('#seed', '21');
    await page.click('#hires-panel summary');
    // A1111's list: the latent modes first, then /sdapi/v1/upscalers.
    const latent = (await (await fetch(`${server.base}/sdapi/v1/latent-upscale-modes`)).json()).map((m) => m.name);
    const upscalers = (await (await fetch(`${server.base}/sdapi/v1/upscalers`)).json()).map((u) => u.name);
    await page.waitForFunction((n) => document.querySelector('#hr-upscaler').options.length === n, new Set([...latent, ...upscalers]).size);
    const options = await page.$$eval('#hr-upscaler option', (o) => o.map((x) => x.value));
    assert.deepEqual(options, [...new Set([...latent, ...upscalers])]);
    assert.equal(await page.inputValue('#hr-upscaler'), 'Latent');
    await page.check('#hr-enabled');
    await page.fill('#hr-scale', '2');
    await page.fill('#hr-steps', '1');
    await page.fill('#hr-denoising', '0.5');
    assert.equal(await page.textContent('#hr-size'), 'From 64×64 to 128×128');
    assert.match(await page.textContent('#hires-state'), /on, ×2 Latent/);
    const created = page.waitForResponse((r) => r.url().endsWith('/api/v1/jobs') && r.request().method() === 'POST');
    await page.click('#generate');
    const response = await created;
    assert.equal(response.status(), 202, await response.text());
    const { params } = JSON.parse(response.request().postData());
    assert.equal(params.enable_hr, true);
    assert.equal(params.hr_scale, 2);
    assert.equal(params.hr_upscaler, 'Latent');
    assert.equal(params.hr_second_pass_steps, 1);
    assert.equal(params.denoising_strength, 0.5);
    const final = await finishedJob(server.base, (await response.json()).id);
    assert.equal(final.state, 'succeeded', JSON.stringify(final));
    assert.match(final.images[0].infotext, /Denoising strength: 0\.5/);
    assert.match(final.images[0].infotext, /Hires upscale: 2/);
    assert.match(final.images[0].infotext, /Hires upscaler: Latent/);
    await page.waitForFunction((url) => document.querySelector('#results img')?.getAttribute('src') === url && document.querySelector('#results img').naturalWidth > 0, final.images[0].url);
    assert.deepEqual(await page.$eval('#results img', (img) => [img.naturalWidth, img.naturalHeight]), [128, 128]);
    await page.screenshot({ path: path.join(shots, 'hires.png'), fullPage: true });
    // img2img has no hires fix: the panel is hidden and nothing of it is sent.
    await page.click('.tabs [data-tab="img2img"]');
    assert.equal(await page.isHidden('#hires-panel'), true);
    await page.click('.tabs [data-tab="txt2img"]');
    assert.equal(await page.isVisible('#hires-panel'), true);
    await page.uncheck('#hr-enabled');
    assert.equal(await page.textContent('#hires-state'), '');
  });

  it('Tiling and the Extra section\'s variation seed reach the request and the infotext', async () => {
    await page.click('.tabs [data-tab="txt2img"]');
    await page.fill('#steps', '2');
    await page.fill('#seed', '22');
    await page.check('#tiling');
    await page.click('#extra-panel summary');
    await page.fill('#subseed', '99');
    await page.fill('#subseed-strength', '0.25');
    // One side alone does not resize the seed (A1111 needs both).
    await page.fill('#seed-resize-w', '128');
    assert.equal(await page.textContent('#extra-state'), '· strength 0.25');
    const run = () => generatedImage(page, server.base);
    const first = await run();
    assert.equal(first.params.tiling, true);
    assert.equal(first.params.subseed, 99);
    assert.equal(first.params.subseed_strength, 0.25);
    assert.equal(first.params.seed_resize_from_w, undefined);
    assert.match(first.infotext, /Tiling: True/);
    assert.match(first.infotext, /Variation seed: 99, Variation seed strength: 0\.25/);
    assert.doesNotMatch(first.infotext, /Seed resize from/);

    await page.fill('#seed-resize-h', '96');
    assert.equal(await page.textContent('#extra-state'), '· strength 0.25, from 128×96');
    // 🎲 then ♻ brings the last image's variation seed back.
    await page.click('#subseed-random');
    assert.equal(await page.inputValue('#subseed'), '-1');
    await page.click('#subseed-reuse');
    assert.equal(await page.inputValue('#subseed'), '99');
    await page.uncheck('#tiling');
    const second = await run();
    assert.equal(second.params.tiling, undefined);
    assert.deepEqual([second.params.seed_resize_from_w, second.params.seed_resize_from_h], [128, 96]);
    assert.doesNotMatch(second.infotext, /Tiling/);
    assert.match(second.infotext, /Seed resize from: 128x96/);

    // A strength out of range is the server's 400, shown with its message.
    await page.fill('#subseed-strength', '1.5');
    const response = await submitJob(page);
    assert.equal(response.status(), 400);
    const { error } = await response.json();
    assert.match(error, /subseed_strength/);
    await page.locator('#errors .error-text', { hasText: error }).waitFor();
    for (const [id, value] of [['subseed', '-1'], ['subseed-strength', '0'], ['seed-resize-w', '0'], ['seed-resize-h', '0']]) await page.fill(`#${id}`, value);
    assert.equal(await page.textContent('#extra-state'), '');
  });

  it('The Extra section\'s step cache reaches the request and the infotext; 1 sends nothing', async () => {
    await page.click('.tabs [data-tab="txt2img"]');
    await page.fill('#steps', '3');
    await page.fill('#seed', '24');
    if (!(await page.isVisible('#step-cache-interval'))) await page.click('#extra-panel summary');
    await page.fill('#step-cache-interval', '2');
    await page.fill('#step-cache-branch', '1');
    assert.equal(await page.textContent('#extra-state'), '· step cache every 2, branch 1');
    const run = () => generatedImage(page, server.base);
    const cached = await run();
    assert.deepEqual(cached.params.override_settings, { step_cache_interval: 2, step_cache_branch: 1 });
    assert.match(cached.infotext, /Step cache interval: 2, Step cache branch: 1/);

    // 0 is not an interval: the server's 400, shown with its message.
    await page.fill('#step-cache-interval', '0');
    const refused = await submitJob(page);
    assert.equal(refused.status(), 400);
    const { error } = await refused.json();
    assert.match(error, /step_cache_interval/);
    await page.locator('#errors .error-text', { hasText: error }).waitFor();

    await page.fill('#step-cache-interval', '1');
    assert.equal(await page.textContent('#extra-state'), '');
    const plain = await run();
    assert.equal(plain.params.override_settings, undefined);
    assert.doesNotMatch(plain.infotext, /Step cache/);
    await page.fill('#step-cache-branch', '0');
  });

  it('X/Y/Z plot of Steps "1,2": A1111\'s positional script_args, the grid first, then each image', async () => {
    await page.click('.tabs [data-tab="txt2img"]');
    await page.fill('#prompt', 'a lighthouse');
    await page.fill('#steps', '2');
    await page.fill('#seed', '23');
    // The scripts of each tab, from /sdapi/v1/scripts.
    await page.waitForFunction(() => document.querySelector('#script-name').options.length > 1);
    assert.deepEqual(await page.$$eval('#script-name option', (o) => o.map((x) => x.textContent)), ['None', 'Prompt matrix', 'X/Y/Z plot']);
    await page.click('.tabs [data-tab="img2img"]');
    assert.deepEqual(await page.$$eval('#script-name option', (o) => o.map((x) => x.textContent)), ['None', 'Prompt matrix', 'SD upscale', 'X/Y/Z plot']);
    await page.click('.tabs [data-tab="txt2img"]');
    await page.selectOption('#script-name', 'x/y/z plot');
    assert.equal(await page.isVisible('#script-xyz'), true);
    assert.equal(await page.isHidden('#script-matrix'), true);
    // The axis types are the tab's list of /sdapi/v1/script-info, X Seed and Y, Z Nothing by default.
    const info = await (await fetch(`${server.base}/sdapi/v1/script-info`)).json();
    const axes = info.find((s) => s.name === 'x/y/z plot' && !s.is_img2img).args[0].choices;
    assert.deepEqual(await page.$$eval('#xyz-x-type option', (o) => o.map((x) => x.textContent)), axes);
    assert.deepEqual(await Promise.all(['x', 'y', 'z'].map((a) => page.$eval(`#xyz-${a}-type`, (s) => s.selectedOptions[0].textContent))), ['Seed', 'Nothing', 'Nothing']);
    await page.selectOption('#xyz-x-type', { label: 'Steps' });
    assert.match(await page.getAttribute('#xyz-x-values', 'placeholder'), /10-30/);
    await page.fill('#xyz-x-values', '1,2');
    await page.check('#xyz-sub-images');
    const created = page.waitForResponse((r) => r.url().endsWith('/api/v1/jobs') && r.request().method() === 'POST');
    await page.click('#generate');
    const response = await created;
    assert.equal(response.status(), 202, await response.text());
    const { params } = JSON.parse(response.request().postData());
    assert.equal(params.script_name, 'x/y/z plot');
    // x_type, x_values, x_values_dropdown, … z_values_dropdown, draw_legend, include_lone_images,
    // include_sub_grids, no_fixed_seeds, vary_seeds_x/y/z, margin_size, csv_mode (text inputs).
    assert.equal(axes.indexOf('Steps'), 4, 'A1111 1.10 txt2img index of Steps');
    assert.deepEqual(params.script_args, [4, '1,2', [], 0, '', [], 0, '', [], true, true, false, false, false, false, false, 0, true]);
    const final = await finishedJob(server.base, (await response.json()).id);
    assert.equal(final.state, 'succeeded', JSON.stringify(final));
    assert.equal(final.images.length, 3, 'the grid and two images');
    assert.deepEqual(final.images.map((i) => i.grid === true), [true, false, false], 'the job marks its grid');
    assert.match(final.images[0].infotext, /Script: X\/Y\/Z plot, X Type: Steps, X Values: "1,2"/);
    assert.match(final.images[1].infotext, /Steps: 1,/);
    assert.match(final.images[2].infotext, /Steps: 2,/);

    // The results: the grid first across the row, then the two images, each with its buttons.
    await page.locator('#progress-text', { hasText: /^Done: .*3 images/ }).waitFor();
    const figures = page.locator('#results figure');
    assert.equal(await figures.count(), 3);
    assert.deepEqual(await figures.evaluateAll((f) => f.map((x) => x.dataset.kind)), ['grid', 'image', 'image']);
    assert.deepEqual(await page.$$eval('#results img', (i) => i.map((x) => x.getAttribute('src'))), final.images.map((i) => i.url));
    assert.match(await figures.first().locator('figcaption').textContent(), /X\/Y\/Z plot grid/);
    await page.waitForFunction(() => [...document.querySelectorAll('#results img')].every((i) => i.complete && i.naturalWidth > 0));
    const [grid, cell] = await page.$$eval('#results figure', (f) => f.slice(0, 2).map((x) => x.getBoundingClientRect().width));
    assert.ok(grid > cell * 1.5, `the grid spans the row (${grid}px, a cell ${cell}px)`);
    const gridImage = await page.$eval('#results figure[data-kind="grid"] img', (i) => [i.naturalWidth, i.naturalHeight]);
    assert.ok(gridImage[0] >= 128 && gridImage[1] > 64, `the grid holds two cells and a legend: ${gridImage}`);
    await page.screenshot({ path: path.join(shots, 'xyz.png'), fullPage: true });

    // "Send to img2img" from the first cell: its image and its own parameters (1 step, not 2).
    await figures.nth(1).locator('button', { hasText: 'Send to img2img' }).click();
    await page.waitForFunction(() => document.querySelector('.tabs [data-tab="img2img"]').getAttribute('aria-selected') === 'true' && !document.querySelector('#mask-wrap').hidden);
    assert.deepEqual(await page.$eval('#init-canvas', (c) => [c.width, c.height]), [64, 64]);
    assert.equal(await page.inputValue('#steps'), '1');
    assert.equal(await page.inputValue('#seed'), '23');
    // And from the grid: the init image is the grid.
    await page.click('.tabs [data-tab="txt2img"]');
    await figures.first().locator('button', { hasText: 'Send to img2img' }).click();
    await page.waitForFunction((w) => document.querySelector('#init-canvas').width === w, gridImage[0]);
    assert.equal(await page.inputValue('#script-name'), 'x/y/z plot', 'the X/Y/Z plot is on img2img too');
    await page.click('.tabs [data-tab="txt2img"]');
    await page.fill('#width', '64');
    await page.fill('#height', '64');
    await page.fill('#steps', '2');
  });

  it('a bad X/Y/Z value is refused with the server\'s message shown', async () => {
    await page.click('.tabs [data-tab="txt2img"]');
    await page.selectOption('#script-name', 'x/y/z plot');
    await page.selectOption('#xyz-x-type', { label: 'Steps' });
    await page.fill('#xyz-x-values', '1,zero');
    const refused = page.waitForResponse((r) => r.url().endsWith('/api/v1/jobs') && r.request().method() === 'POST');
    await page.click('#generate');
    const response = await refused;
    assert.equal(response.status(), 400);
    const { error } = await response.json();
    assert.match(error, /X values \(Steps\)/);
    assert.match(error, /zero/);
    await page.locator('#errors .error-text', { hasText: error }).waitFor();
    // An axis sdkube does not act on is named too.
    await page.selectOption('#xyz-x-type', { label: 'Sigma Churn' });
    await page.fill('#xyz-x-values', '0.1,0.2');
    const unsupported = page.waitForResponse((r) => r.url().endsWith('/api/v1/jobs') && r.request().method() === 'POST');
    await page.click('#generate');
    const second = await (await unsupported).json();
    assert.match(second.error, /Sigma Churn/);
    await page.locator('#errors .error-text', { hasText: second.error }).waitFor();
    await page.selectOption('#script-name', '');
    assert.equal(await page.isHidden('#script-xyz'), true);
  });

  it('Prompt matrix and SD upscale send A1111\'s positional script_args', async () => {
    await page.click('.tabs [data-tab="txt2img"]');
    await page.fill('#prompt', 'a lighthouse|at dusk');
    await page.fill('#steps', '1');
    await page.selectOption('#script-name', 'prompt matrix');
    assert.equal(await page.isVisible('#script-matrix'), true);
    await page.selectOption('#matrix-delimiter', 'space');
    const run = async () => {
      const created = page.waitForResponse((r) => r.url().endsWith('/api/v1/jobs') && r.request().method() === 'POST');
      await page.click('#generate');
      const response = await created;
      assert.equal(response.status(), 202, await response.text());
      const { params } = JSON.parse(response.request().postData());
      const final = await finishedJob(server.base, (await response.json()).id);
      assert.equal(final.state, 'succeeded', JSON.stringify(final));
      await page.locator('#progress-text', { hasText: /^Done/ }).waitFor();
      return { params, final };
    };
    const matrix = await run();
    assert.equal(matrix.params.script_name, 'prompt matrix');
    assert.deepEqual(matrix.params.script_args, [false, false, 'positive', 'space', 0]);
    assert.equal(matrix.final.images.length, 3, 'the grid and two prompts');
    assert.match(matrix.final.images[2].infotext, /^a lighthouse at dusk\n/);
    assert.equal(await page.getAttribute('#results figure:first-child', 'data-kind'), 'grid');

    // SD upscale on img2img, from the image just made: 64 → 128 in 64 px tiles.
    await page.locator('#results figure').nth(1).locator('button', { hasText: 'Send to img2img' }).click();
    await page.waitForFunction(() => document.querySelector('.tabs [data-tab="img2img"]').getAttribute('aria-selected') === 'true' && !document.querySelector('#mask-wrap').hidden);
    await page.fill('#prompt', 'a lighthouse');
    await page.selectOption('#script-name', 'sd upscale');
    assert.equal(await page.isVisible('#script-sdupscale'), true);
    const upscalers = (await (await fetch(`${server.base}/sdapi/v1/upscalers`)).json()).map((u) => u.name);
    assert.deepEqual(await page.$$eval('#sdu-upscaler option', (o) => o.map((x) => x.textContent)), upscalers);
    assert.equal(await page.$eval('#sdu-upscaler', (s) => s.selectedOptions[0].textContent), 'Lanczos');
    await page.fill('#sdu-overlap', '16');
    await page.fill('#denoising', '0.3');
    const upscale = await run();
    assert.equal(upscale.params.script_name, 'sd upscale');
    assert.deepEqual(upscale.params.script_args, ['', 16, upscalers.indexOf('Lanczos'), 2]);
    assert.equal(upscale.final.images.length, 1);
    await page.waitForFunction(() => document.querySelector('#results img')?.naturalWidth > 0);
    assert.deepEqual(await page.$eval('#results img', (i) => [i.naturalWidth, i.naturalHeight]), [128, 128]);
    assert.equal(await page.getAttribute('#results figure', 'data-kind'), 'image', 'SD upscale makes no grid');
    await page.selectOption('#script-name', '');
    await page.click('.tabs [data-tab="txt2img"]');
    await page.fill('#prompt', 'a lighthouse');
    await page.fill('#steps', '2');
  });

  it('fits a 375 px phone screen: no horizontal scrolling, controls stacked', async () => {
    const phone = await browser.newContext({ viewport: { width: 375, height: 740 }, isMobile: true, hasTouch: true });
    const mobile = await phone.newPage();
    watchPage(mobile, problems);
    await mobile.goto(server.base);
    await mobile.waitForFunction(() => document.querySelector('#sampler').options.length > 0);
    for (const tab of ['txt2img', 'img2img', 'extras', 'queue', 'gallery', 'embeddings', 'loras']) {
      await mobile.click(`.tabs [data-tab="${tab}"]`);
      await mobile.waitForTimeout(150);
      const { scroll, client } = await mobile.evaluate(() => ({ scroll: document.documentElement.scrollWidth, client: document.documentElement.clientWidth }));
      assert.ok(scroll <= client, `${tab} tab: page is ${scroll}px wide on a ${client}px screen`);
      if (tab === 'gallery') {
        await mobile.locator('#gallery .gallery-item').first().click();
        const wide = await mobile.evaluate(() => document.documentElement.scrollWidth);
        assert.ok(wide <= 375, `gallery detail: ${wide}px wide`);
      }
    }
    // img2img with an image and its mask canvas, then the docs page.
    await mobile.click('.tabs [data-tab="gallery"]');
    await mobile.locator('#gallery .gallery-item').first().click();
    await mobile.click('#gallery-to-img2img');
    await mobile.locator('#mask-wrap').waitFor();
    assert.ok((await mobile.evaluate(() => document.documentElement.scrollWidth)) <= 375, 'img2img with an image fits');
    await mobile.screenshot({ path: path.join(shots, 'phone-img2img.png'), fullPage: true });
    await mobile.goto(`${server.base}/docs`);
    await mobile.locator('#docs-count').waitFor();
    await mobile.locator('.op[data-method="post"][data-path="/api/v1/jobs"] > summary').click();
    assert.ok((await mobile.evaluate(() => document.documentElement.scrollWidth)) <= 375, 'the docs page fits');
    await mobile.goto(server.base);
    await mobile.waitForFunction(() => document.querySelector('#sampler').options.length > 0);
    await mobile.click('.tabs [data-tab="txt2img"]');
    const inputs = await mobile.locator('.gen-inputs').boundingBox();
    const output = await mobile.locator('.gen-output').boundingBox();
    assert.ok(output.y >= inputs.y + inputs.height - 1, 'the output stacks below the inputs');
    assert.ok(inputs.width > 300, `the inputs use the screen width (${inputs.width}px)`);
    // The Extra and Hires. fix sections open and the X/Y/Z plot's controls shown still fit.
    await mobile.click('#extra-panel summary');
    await mobile.click('#hires-panel summary');
    await mobile.waitForFunction(() => document.querySelector('#script-name').options.length > 1);
    await mobile.selectOption('#script-name', 'x/y/z plot');
    await mobile.selectOption('#xyz-y-type', { label: 'Negative Guidance minimum sigma' });
    assert.equal(await mobile.isVisible('#xyz-z-values'), true);
    const withPanels = await mobile.evaluate(() => document.documentElement.scrollWidth);
    assert.ok(withPanels <= 375, `txt2img with the panels open: ${withPanels}px wide`);
    await mobile.screenshot({ path: path.join(shots, 'phone.png'), fullPage: true });
    await phone.close();
  });

  it('/docs lists every endpoint of /openapi.json and can try one', async () => {
    const spec = await (await fetch(`${server.base}/openapi.json`)).json();
    const operations = [];
    for (const [p, item] of Object.entries(spec.paths)) {
      for (const method of ['get', 'put', 'post', 'delete', 'patch']) if (item[method]) operations.push(`${method} ${p}`);
    }
    assert.ok(operations.length > 5, `the document has operations: ${operations.length}`);
    await page.goto(`${server.base}/docs`);
    await page.locator('#docs-count').waitFor();
    const listed = new Set(await page.$$eval('.op', (ops) => ops.map((op) => `${op.dataset.method} ${op.dataset.path}`)));
    for (const op of operations) assert.ok(listed.has(op), `${op} is listed`);
    assert.ok((await page.locator('.tag-group').count()) >= 1);

    const statusOp = page.locator('.op[data-method="get"][data-path="/api/v1/status"]');
    await statusOp.locator(':scope > summary').click();
    await statusOp.locator('.try button.primary').click();
    const body = statusOp.locator('.response-body');
    await body.waitFor();
    const shown = JSON.parse(await body.textContent());
    assert.equal(shown.model.state, 'ready');

    // "Try it" with a bad body shows the server's 400 and its message.
    const jobsOp = page.locator('.op[data-method="post"][data-path="/api/v1/jobs"]');
    await jobsOp.locator(':scope > summary').click();
    const bad = { kind: 'txt2img', params: { prompt: 'x', steps: 100000, width: 64, height: 64 } };
    await jobsOp.locator('.try textarea').fill(JSON.stringify(bad));
    await jobsOp.locator('.try button.primary').click();
    await jobsOp.locator('.response-body').waitFor();
    assert.equal(await jobsOp.locator('.response-status .status').textContent(), '400');
    const direct = await fetch(`${server.base}/api/v1/jobs`, { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(bad) });
    assert.equal(JSON.parse(await jobsOp.locator('.response-body').textContent()).error, (await direct.json()).error);
    await page.screenshot({ path: path.join(shots, 'docs.png') });
  });

  it('switches the model from the header select', async () => {
    await page.goto(server.base);
    await page.waitForFunction(() => [...document.querySelector('#model').options].some((o) => o.value === 'sd1-copy'));
    const switched = page.waitForResponse((r) => r.url().endsWith('/sdapi/v1/options') && r.request().method() === 'POST');
    await page.selectOption('#model', 'sd1-copy');
    const response = await switched;
    assert.equal(response.status(), 200, await response.text());
    assert.deepEqual(JSON.parse(response.request().postData()), { sd_model_checkpoint: 'sd1-copy' });
    const status = await (await fetch(`${server.base}/api/v1/status`)).json();
    assert.equal(status.model.name, 'sd1-copy');
    assert.equal(status.model.state, 'ready');
    await page.locator('#model-banner').waitFor({ state: 'hidden' });
    assert.equal(await page.inputValue('#model'), 'sd1-copy');
  });

  it('raised no page or console errors', () => {
    // The bad-parameter request logs its 400 in the console: that one is expected.
    const unexpected = problems.filter((p) => !/status of 400/.test(p));
    assert.deepEqual(unexpected, []);
  });
});

describe('sdkube web UI behind --api-key', { timeout: 60_000 }, () => {
  const key = 'ui-test-key-4711';
  let server;
  let browser;

  before(async () => {
    [server, browser] = await startBoth(['--api-key', key]);
  });

  after(async () => {
    await browser?.close();
    await server?.stop();
  });

  it('asks for the key once, keeps it, and generates with it (header and SSE cookie)', async () => {
    const refused = await fetch(`${server.base}/api/v1/status`);
    assert.equal(refused.status, 401);
    assert.equal((await refused.json()).auth, 'api_key');

    const page = await browser.newPage();
    page.setDefaultTimeout(STEP_TIMEOUT);
    const problems = [];
    watchPage(page, problems);
    await page.goto(server.base);
    await page.locator('#auth-dialog').waitFor({ state: 'visible' });
    await page.fill('#auth-key', key);
    await page.click('#auth-form button[type="submit"]');
    await page.waitForFunction(() => document.querySelector('#model').options.length > 0 && document.querySelector('#sampler').options.length > 0);
    assert.equal(await page.evaluate(() => localStorage.getItem('sdkube_api_key')), key);
    assert.match(await page.evaluate(() => document.cookie), new RegExp(`sdkube_api_key=${key}`));

    // After a reload the stored key is used without asking again.
    await page.reload();
    await page.waitForFunction(() => document.querySelector('#sampler').options.length > 0);
    assert.equal(await page.locator('#auth-dialog').isVisible(), false);
    await page.fill('#width', '64');
    await page.fill('#height', '64');
    await page.fill('#steps', '2');
    const streams = [];
    page.on('response', (r) => r.url().endsWith('/events') && streams.push(r.status()));
    await page.click('#generate');
    await page.locator('#results img').waitFor();
    await page.waitForFunction(() => document.querySelector('#results img').naturalWidth === 64);
    assert.deepEqual(streams, [200], 'the event stream was let in by the cookie');
    assert.equal((await page.textContent('#errors')).trim(), '');
    // Only the refusals before the key was given reached the console.
    assert.deepEqual(problems.filter((p) => !/status of 401/.test(p)), []);
  });
});

describe('sdkube web UI on a shared queue before any worker runs', { timeout: 90_000 }, () => {
  let redis;
  let api;
  let worker;
  let browser;

  before(async () => {
    const port = await freePort();
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'sdkube-ui-redis-'));
    redis = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--dir', dir, '--save', ''], { stdio: 'ignore' });
    process.once('exit', () => redis.kill('SIGKILL'));
    const queue = `redis://127.0.0.1:${port}`;
    for (let i = 0; i < 100; i += 1) {
      const up = await new Promise((resolve) => {
        const s = net.connect(port, '127.0.0.1', () => { s.end(); resolve(true); });
        s.on('error', () => resolve(false));
      });
      if (up) break;
      await new Promise((r) => setTimeout(r, 100));
    }
    [api, browser] = await startBoth(['--role', 'api', '--queue', queue]);
    api.queue = queue;
  });

  after(async () => {
    await browser?.close();
    await worker?.stop();
    await api?.stop();
    redis?.kill('SIGKILL');
  });

  it('says the job waits for a GPU worker, then shows it done once a worker starts', async () => {
    const page = await browser.newPage();
    page.setDefaultTimeout(STEP_TIMEOUT);
    await page.goto(api.base);
    await page.fill('#prompt', 'a lighthouse');
    await page.fill('#width', '64');
    await page.fill('#height', '64');
    await page.fill('#steps', '3');
    await page.click('#generate');
    const banner = page.locator('#model-banner[data-state="waiting"]');
    await banner.waitFor();
    assert.match((await banner.textContent()).trim(), /^Waiting for a GPU worker \(1 queued\)/);
    assert.match(await page.locator('#progress-text').textContent(), /^Queued/);
    await page.screenshot({ path: path.join(shots, 'waiting-for-worker.png') });

    worker = await startServer(['--role', 'worker', '--queue', api.queue]);
    await page.waitForFunction(() => /^Done/.test(document.querySelector('#progress-text').textContent), null, { timeout: 60_000 });
    // The waiting banner goes with the next status poll: a worker runs, nothing waits.
    await page.waitForFunction(() => document.querySelector('#model-banner').hidden, null, { timeout: 10_000 });
  });
});

describe('sdkube web UI with a model that failed to load', { timeout: 60_000 }, () => {
  let server;
  let browser;
  let modelDir;

  before(async () => {
    // A folder that claims to be a diffusers model but has no networks.
    modelDir = fs.mkdtempSync(path.join(os.tmpdir(), 'sdkube-ui-badmodel-'));
    fs.writeFileSync(path.join(modelDir, 'model_index.json'), '{"_class_name": "StableDiffusionPipeline"}');
    [server, browser] = await startBoth([], { model: modelDir, probe: '/healthz' });
  });

  after(async () => {
    await browser?.close();
    await server?.stop();
    if (modelDir) fs.rmSync(modelDir, { recursive: true, force: true });
  });

  it('shows a failed banner with the reason, and the refusal when generating', async () => {
    let status;
    for (let i = 0; i < 100; i += 1) {
      status = await (await fetch(`${server.base}/api/v1/status`)).json();
      if (status.model.state === 'failed') break;
      await new Promise((r) => setTimeout(r, 100));
    }
    assert.equal(status.model.state, 'failed', JSON.stringify(status));
    assert.ok(status.model.message, 'the server says why');

    const page = await browser.newPage();
    page.setDefaultTimeout(STEP_TIMEOUT);
    await page.goto(server.base);
    const banner = page.locator('#model-banner[data-state="failed"]');
    await banner.waitFor();
    const text = await banner.textContent();
    assert.ok(text.includes(status.model.message), `banner: ${text}`);

    await page.fill('#width', '64');
    await page.fill('#height', '64');
    await page.fill('#steps', '2');
    const refused = page.waitForResponse((r) => r.url().endsWith('/api/v1/jobs') && r.request().method() === 'POST');
    await page.click('#generate');
    const response = await refused;
    assert.equal(response.status(), 503);
    const { error } = await response.json();
    await page.locator('#errors .error-text', { hasText: error }).waitFor();
  });
});

describe('sdkube web UI while the model is being fetched', { timeout: 60_000 }, () => {
  // The fixture SD1 checkpoint, served by a loopback "hub" that trickles the first half (the
  // fetcher reports progress about once a second while bytes arrive) and holds the rest back
  // until the test says so: the download is caught in the middle, every time.
  const checkpoint = path.join(repo, 'fixtures/sd/sd1.safetensors');
  const bytes = fs.readFileSync(checkpoint);
  const half = Math.floor(bytes.length / 2);
  let release;
  const released = new Promise((resolve) => (release = resolve));
  let hub;
  let server;
  let browser;
  let dir;

  before(async () => {
    hub = http.createServer(async (req, res) => {
      if (req.url !== '/sd1.safetensors') {
        res.writeHead(404).end();
        return;
      }
      let start = 0;
      let end = bytes.length - 1;
      const range = /^bytes=(\d+)-(\d*)$/.exec(req.headers.range || '');
      if (range) {
        start = Number(range[1]);
        if (range[2]) end = Math.min(end, Number(range[2]));
      }
      const headers = { 'Content-Type': 'application/octet-stream', 'Content-Length': end - start + 1, 'Accept-Ranges': 'bytes' };
      if (range) headers['Content-Range'] = `bytes ${start}-${end}/${bytes.length}`;
      res.writeHead(range ? 206 : 200, headers);
      if (req.method === 'HEAD') return res.end();
      const piece = 16 * 1024;
      let at = start;
      let open = true;
      res.on('close', () => (open = false));
      while (open && at < Math.min(end + 1, half)) {
        const next = Math.min(at + piece, end + 1, half);
        res.write(bytes.subarray(at, next));
        at = next;
        await Promise.race([released, new Promise((r) => setTimeout(r, 50))]);
      }
      await released;
      if (end + 1 > half) res.write(bytes.subarray(Math.max(start, half), end + 1));
      res.end();
    });
    await new Promise((resolve) => hub.listen(0, '127.0.0.1', resolve));
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'sdkube-ui-catalog-'));
    const sha256 = crypto.createHash('sha256').update(bytes).digest('hex');
    const catalog = path.join(dir, 'catalog.toml');
    fs.writeFileSync(
      catalog,
      [
        '[[model]]',
        'name = "ui-slow"',
        'kind = "checkpoint"',
        'description = "the SD1 fixture, served slowly by the UI test"',
        '[[model.file]]',
        `url = "http://127.0.0.1:${hub.address().port}/sd1.safetensors"`,
        `size = ${bytes.length}`,
        `sha256 = "${sha256}"`,
        '',
      ].join('\n'),
    );
    [server, browser] = await startBoth(['--catalog', catalog], { model: 'ui-slow', probe: '/healthz' });
  });

  after(async () => {
    release?.();
    await browser?.close();
    await server?.stop();
    hub?.closeAllConnections?.();
    await new Promise((resolve) => (hub ? hub.close(resolve) : resolve()));
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  it('shows the download with its progress, then the state the model ends in', async () => {
    const page = await browser.newPage();
    page.setDefaultTimeout(STEP_TIMEOUT);
    await page.goto(server.base);
    const banner = page.locator('#model-banner[data-state="fetching"]');
    await banner.waitFor();
    await page.waitForFunction(() => document.querySelector('#model-banner-progress').value > 0);
    const text = await banner.textContent();
    assert.match(text, /Downloading model ui-slow/);
    assert.match(text, /\d+%/);
    const [value, max] = await page.$eval('#model-banner-progress', (p) => [p.value, p.max]);
    assert.equal(max, bytes.length);
    assert.ok(value > 0 && value <= half, `progress ${value} of ${max} while half is held back`);
    await page.screenshot({ path: path.join(shots, 'fetching.png') });

    // Then the banner follows the server to the end of loading, whatever that end is (the
    // single-file fixture may not load as a full-size SD1 layout): it must say what the server says.
    release();
    let status;
    for (let i = 0; i < 300; i += 1) {
      status = await (await fetch(`${server.base}/api/v1/status`)).json();
      if (status.model.state === 'ready' || status.model.state === 'failed') break;
      await new Promise((r) => setTimeout(r, 100));
    }
    if (status.model.state === 'ready') {
      await page.locator('#model-banner').waitFor({ state: 'hidden' });
    } else {
      assert.equal(status.model.state, 'failed');
      await page.locator('#model-banner[data-state="failed"]', { hasText: status.model.message }).waitFor();
      assert.equal(await page.isHidden('#model-banner-progress'), true);
    }
  });
});

describe('sdkube web UI behind --basic-auth', { timeout: 60_000 }, () => {
  let server;
  let browser;

  before(async () => {
    [server, browser] = await startBoth(['--basic-auth', 'painter:brush-4711']);
  });

  after(async () => {
    await browser?.close();
    await server?.stop();
  });

  it('works with the credentials the browser sends, including the event stream', async () => {
    const refused = await fetch(`${server.base}/`);
    assert.equal(refused.status, 401);
    assert.match(refused.headers.get('www-authenticate') || '', /^Basic/);

    const context = await browser.newContext({ httpCredentials: { username: 'painter', password: 'brush-4711' } });
    const page = await context.newPage();
    page.setDefaultTimeout(STEP_TIMEOUT);
    const streams = [];
    page.on('response', (r) => r.url().endsWith('/events') && streams.push(r.status()));
    await page.goto(server.base);
    await page.waitForFunction(() => document.querySelector('#sampler').options.length > 0);
    await page.fill('#width', '64');
    await page.fill('#height', '64');
    await page.fill('#steps', '2');
    await page.click('#generate');
    await page.waitForFunction(() => document.querySelector('#results img')?.naturalWidth === 64);
    assert.equal((await page.textContent('#errors')).trim(), '');
    assert.equal(await page.locator('#auth-dialog').isVisible(), false);
    assert.deepEqual(streams, [200]);
    await context.close();
  });
});
