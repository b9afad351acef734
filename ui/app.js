// sdkube web UI and API docs page.
//
// One plain ES module, no build step and no dependencies, so that the binary can embed it and
// the UI works with no internet. `index.html` (data-page="ui") runs `startUi`, `docs.html`
// (data-page="docs") runs `startDocs`; both talk to the server through `api`, which turns
// every error response into an `ApiError` carrying the server's own message.

const API_KEY_STORAGE = 'sdkube_api_key';
const API_KEY_COOKIE = 'sdkube_api_key';

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

/** An HTTP failure with the message the server gave (its JSON `error` field). */
class ApiError extends Error {
  constructor(status, message, body) {
    super(message);
    this.status = status;
    this.body = body;
  }
}

function storedApiKey() {
  try {
    return localStorage.getItem(API_KEY_STORAGE) || '';
  } catch {
    return '';
  }
}

/** Remembers the key for fetch (header) and EventSource (cookie, it cannot send headers). */
function storeApiKey(key) {
  try {
    localStorage.setItem(API_KEY_STORAGE, key);
  } catch {
    // Private mode: the cookie alone still works for this session.
  }
  setApiKeyCookie(key);
}

function setApiKeyCookie(key) {
  if (!key) return;
  // Cookie values cannot hold ; , or whitespace; keys normally don't, encode them if they do.
  const value = /^[\x21-\x7e]+$/.test(key) && !/[;,"\\]/.test(key) ? key : encodeURIComponent(key);
  document.cookie = `${API_KEY_COOKIE}=${value}; path=/; max-age=31536000; SameSite=Strict`;
}

function authHeaders() {
  const key = storedApiKey();
  return key ? { 'X-Api-Key': key } : {};
}

/** The clearest message an error response carries. */
function errorMessage(status, statusText, data) {
  if (data && typeof data === 'object') {
    const parts = [];
    if (typeof data.error === 'string') parts.push(data.error);
    if (typeof data.detail === 'string' && data.detail !== data.error) parts.push(data.detail);
    if (typeof data.message === 'string' && !parts.length) parts.push(data.message);
    if (typeof data.errors === 'string' && !parts.length) parts.push(data.errors);
    if (parts.length) return parts.join(': ');
  }
  if (typeof data === 'string' && data.trim()) return data.trim().slice(0, 500);
  return `HTTP ${status} ${statusText || ''}`.trim();
}

let apiKeyPrompt = null;

/** Asks once for the API key however many requests were refused at the same time. */
function askForApiKey(message) {
  if (!apiKeyPrompt) {
    apiKeyPrompt = promptApiKey(message).finally(() => {
      apiKeyPrompt = null;
    });
  }
  return apiKeyPrompt;
}

function promptApiKey(message) {
  const dialog = document.getElementById('auth-dialog');
  if (!dialog) {
    const key = window.prompt(`${message || 'This server requires an API key.'}\nAPI key:`);
    if (!key) return Promise.reject(new ApiError(401, message || 'API key required'));
    storeApiKey(key);
    return Promise.resolve();
  }
  const form = document.getElementById('auth-form');
  const input = document.getElementById('auth-key');
  document.getElementById('auth-message').textContent = message || 'This server requires an API key.';
  input.value = '';
  return new Promise((resolve, reject) => {
    const onSubmit = (event) => {
      event.preventDefault();
      const key = input.value.trim();
      if (!key) return;
      cleanup();
      dialog.close();
      storeApiKey(key);
      resolve();
    };
    const onCancel = () => {
      cleanup();
      reject(new ApiError(401, message || 'API key required'));
    };
    const cleanup = () => {
      form.removeEventListener('submit', onSubmit);
      dialog.removeEventListener('cancel', onCancel);
    };
    form.addEventListener('submit', onSubmit);
    dialog.addEventListener('cancel', onCancel);
    dialog.showModal();
    input.focus();
  });
}

/**
 * Calls the server and returns the parsed JSON body. Throws `ApiError` with the server's
 * message on any 4xx/5xx; a 401 asking for an API key prompts for it and retries.
 */
async function api(path, { method = 'GET', body } = {}) {
  const headers = { Accept: 'application/json', ...authHeaders() };
  let payload;
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    payload = typeof body === 'string' ? body : JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, { method, headers, body: payload, credentials: 'same-origin' });
  } catch (err) {
    throw new ApiError(0, `cannot reach the server (${method} ${path}): ${err.message}`);
  }
  const text = await response.text();
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = text;
    }
  }
  if (response.status === 401 && data && data.auth === 'api_key') {
    await askForApiKey(data.error);
    return api(path, { method, body });
  }
  if (!response.ok) throw new ApiError(response.status, errorMessage(response.status, response.statusText, data), data);
  return data;
}

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

const $ = (id) => document.getElementById(id);

/** Creates an element: `el('a', {href: '/x', class: 'y'}, 'text', child)`. */
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith('on') && typeof value === 'function') node.addEventListener(name.slice(2), value);
    else if (name === 'class') node.className = value;
    else if (name === 'dataset') Object.assign(node.dataset, value);
    else node.setAttribute(name, value === true ? '' : value);
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function formatBytes(n) {
  if (!Number.isFinite(n)) return '?';
  const units = ['B', 'KB', 'MB', 'GB', 'TB'];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) {
    n /= 1000;
    i += 1;
  }
  return `${n.toFixed(i === 0 ? 0 : 1)} ${units[i]}`;
}

function formatSeconds(s) {
  if (s === null || s === undefined || !Number.isFinite(s)) return '';
  if (s < 60) return `${s.toFixed(1)} s`;
  return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
}

function readFileAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error(`cannot read ${file.name || 'the file'}`));
    reader.readAsDataURL(file);
  });
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => reject(new Error('the file is not an image the browser can read'));
    image.src = src;
  });
}

/** Downloads an output image (with the API key) as a data URL. */
async function fetchImageAsDataUrl(url) {
  const response = await fetch(url, { headers: authHeaders(), credentials: 'same-origin' });
  if (!response.ok) {
    const text = await response.text();
    let data = text;
    try {
      data = JSON.parse(text);
    } catch {
      // not JSON: keep the text
    }
    throw new ApiError(response.status, errorMessage(response.status, response.statusText, data), data);
  }
  return readFileAsDataUrl(await response.blob());
}

/** The base64 payload of a data URL (the API takes plain base64). */
function base64Of(dataUrl) {
  const comma = dataUrl.indexOf(',');
  return comma >= 0 ? dataUrl.slice(comma + 1) : dataUrl;
}

// ---------------------------------------------------------------------------------------------
// Infotext (A1111 "parameters" text chunk)
// ---------------------------------------------------------------------------------------------

/**
 * Parses A1111 infotext: prompt lines, an optional "Negative prompt:" part, and a last line of
 * `Key: value` pairs (values may be quoted). Returns `{prompt, negative_prompt, params}`.
 */
function parseInfotext(text) {
  const lines = (text || '').trim().split('\n');
  let paramsLine = '';
  if (lines.length && /(^|,\s*)Steps:\s*\d/.test(lines[lines.length - 1])) paramsLine = lines.pop();
  const promptLines = [];
  const negativeLines = [];
  let inNegative = false;
  for (const line of lines) {
    if (line.startsWith('Negative prompt:')) {
      inNegative = true;
      negativeLines.push(line.slice('Negative prompt:'.length).trim());
    } else if (inNegative) {
      negativeLines.push(line);
    } else {
      promptLines.push(line);
    }
  }
  const params = {};
  const pair = /\s*([\w ]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)/g;
  let match;
  while ((match = pair.exec(paramsLine)) !== null) {
    if (match[0] === '') break;
    let value = match[2].trim();
    if (value.startsWith('"') && value.endsWith('"')) {
      try {
        value = JSON.parse(value);
      } catch {
        value = value.slice(1, -1);
      }
    }
    params[match[1].trim()] = value;
  }
  return { prompt: promptLines.join('\n'), negative_prompt: negativeLines.join('\n'), params };
}

// ---------------------------------------------------------------------------------------------
// The web UI
// ---------------------------------------------------------------------------------------------

const ui = {
  status: null,
  mode: 'txt2img',
  tab: 'txt2img',
  lastSeed: null,
  lastSubseed: null,
  currentJobId: null,
  followed: new Map(), // job id -> {close()}
  init: null, // {dataUrl, width, height}
  controlImage: null, // data URL of the ControlNet unit's image
  maskPainted: false,
  galleryPage: 1,
  galleryPerPage: 24,
  gallerySelected: null,
  extrasImage: null,
  scripts: null, // /sdapi/v1/scripts: {txt2img: [names], img2img: [names]}
  scriptInfo: null, // /sdapi/v1/script-info
  queueTimer: null,
  statusTimer: null,
};

/** Shows an error message until dismissed (never fail silently). */
function showError(context, err) {
  const message = err instanceof Error ? err.message : String(err);
  const text = context ? `${context}: ${message}` : message;
  const box = $('errors');
  // The same error twice in a row (e.g. polling) is shown once.
  const last = box.lastElementChild;
  if (last && last.dataset.text === text) return;
  const item = el(
    'div',
    { class: 'error', dataset: { text } },
    el('span', { class: 'error-text' }, text),
    el('button', { type: 'button', class: 'dismiss', 'aria-label': 'Dismiss', onclick: () => item.remove() }, '×'),
  );
  box.append(item);
  while (box.children.length > 5) box.firstElementChild.remove();
}

// --- tabs -------------------------------------------------------------------------------------

function selectTab(tab) {
  ui.tab = tab;
  for (const button of document.querySelectorAll('.tabs [data-tab]')) {
    button.setAttribute('aria-selected', String(button.dataset.tab === tab));
  }
  const generate = tab === 'txt2img' || tab === 'img2img';
  if (generate) {
    ui.mode = tab;
    $('tab-generate').dataset.mode = tab;
    $('img2img-panel').hidden = tab !== 'img2img';
    // Hires fix is txt2img's; the scripts and X/Y/Z axes differ between the tabs.
    $('hires-panel').hidden = tab !== 'txt2img';
    renderScriptChoices();
  }
  $('tab-generate').hidden = !generate;
  for (const name of ['extras', 'queue', 'gallery', 'embeddings', 'loras']) $(`tab-${name}`).hidden = tab !== name;
  clearInterval(ui.queueTimer);
  ui.queueTimer = null;
  if (tab === 'queue') {
    refreshQueue();
    ui.queueTimer = setInterval(refreshQueue, 1500);
  }
  if (tab === 'gallery') refreshGallery();
  if (tab === 'embeddings') refreshEmbeddings();
  if (tab === 'loras') refreshLoras();
  if (tab === 'img2img') showBrushSize();
}

// --- server status and model banner ------------------------------------------------------------

async function refreshStatus() {
  clearTimeout(ui.statusTimer);
  let ready = false;
  try {
    const status = await api('/api/v1/status');
    ui.status = status;
    ready = status.model && status.model.state === 'ready';
    renderStatus(status);
  } catch (err) {
    renderBanner('failed', `Server unreachable or refusing: ${err.message}`);
  }
  ui.statusTimer = setTimeout(refreshStatus, ready ? 2000 : 1000);
}

function renderBanner(state, text, progress) {
  const banner = $('model-banner');
  banner.hidden = state === 'ready';
  banner.dataset.state = state;
  $('model-banner-text').textContent = text;
  const bar = $('model-banner-progress');
  bar.hidden = !progress;
  if (progress) {
    bar.max = progress.total_bytes || 1;
    bar.value = progress.done_bytes || 0;
  }
}

function renderStatus(status) {
  const model = status.model || {};
  const name = model.name || 'model';
  const message = model.message ? `: ${model.message}` : '';
  const queue = status.queue || {};
  // A shared queue with no worker running (scaled to zero): jobs wait, the UI says so.
  const waiting = queue.waiting ? `${queue.waiting[0].toUpperCase()}${queue.waiting.slice(1)}: jobs start as soon as one runs` : null;
  switch (waiting ? 'waiting' : model.state) {
    case 'waiting':
      renderBanner('waiting', waiting);
      break;
    case 'fetching': {
      const p = model.progress;
      const amount = p && p.total_bytes
        ? ` ${formatBytes(p.done_bytes)} of ${formatBytes(p.total_bytes)} (${Math.floor((100 * p.done_bytes) / p.total_bytes)}%)`
        : p ? ` ${formatBytes(p.done_bytes)}` : '';
      renderBanner('fetching', `Downloading model ${name}…${amount}${message}`, p && p.total_bytes ? p : null);
      break;
    }
    case 'loading':
      renderBanner('loading', `Loading model ${name}…${message}`);
      break;
    case 'failed':
      renderBanner('failed', `Model ${name} failed${message || ' (no message)'}`);
      break;
    case 'ready':
      renderBanner('ready', '');
      break;
    default:
      renderBanner('loading', `Model ${name}: ${model.state || 'unknown state'}${message}`);
  }
  const parts = [];
  if (status.family) parts.push(status.family);
  if (status.device) parts.push(status.device);
  if (status.role === 'api') parts.push(`${(status.workers || []).length} worker(s)`);
  parts.push(`queue ${queue.running ?? 0} running, ${queue.queued ?? 0} waiting`);
  if (status.version) parts.push(`v${status.version}`);
  $('server-info').textContent = parts.join(' · ');
  const limits = status.limits || {};
  if (limits.max_steps) $('steps').max = limits.max_steps;
  if (limits.max_size) {
    $('width').max = limits.max_size;
    $('height').max = limits.max_size;
  }
  if (limits.max_batch) $('batch-size').max = limits.max_batch;
  if (ui.tab === 'queue') renderQueueSummary(status);
}

// --- models, samplers, schedulers ----------------------------------------------------------------

async function loadModels() {
  const select = $('model');
  try {
    const [models, options] = await Promise.all([api('/sdapi/v1/sd-models'), api('/sdapi/v1/options')]);
    const current = options && options.sd_model_checkpoint;
    select.replaceChildren(
      ...models.map((m) => el('option', { value: m.title, selected: m.title === current || m.model_name === current }, m.model_name || m.title)),
    );
    if (current && !models.some((m) => m.title === current || m.model_name === current)) {
      select.prepend(el('option', { value: current, selected: true }, current));
    }
    select.dataset.current = select.value;
    // A1111's refiner: any listed checkpoint, or none.
    const refiner = $('refiner-checkpoint');
    const chosen = refiner.value;
    refiner.replaceChildren(
      el('option', { value: '' }, 'None'),
      ...models.map((m) => el('option', { value: m.title, selected: m.title === chosen }, m.model_name || m.title)),
    );
  } catch (err) {
    showError('Loading the model list', err);
  }
}

async function switchModel() {
  const select = $('model');
  const wanted = select.value;
  select.disabled = true;
  renderBanner('loading', `Switching to ${wanted}…`);
  try {
    await api('/sdapi/v1/options', { method: 'POST', body: { sd_model_checkpoint: wanted } });
    select.dataset.current = wanted;
  } catch (err) {
    showError(`Switching the model to ${wanted}`, err);
  } finally {
    select.disabled = false;
    // The server decides what is loaded now (a failed switch may still have changed it).
    refreshStatus();
    loadModels();
  }
}

function fillSelect(select, items, valueOf, labelOf, preferred) {
  const previous = select.value;
  select.replaceChildren(...items.map((item) => el('option', { value: valueOf(item) }, labelOf(item))));
  const values = items.map(valueOf);
  if (values.includes(previous)) select.value = previous;
  else if (preferred && values.includes(preferred)) select.value = preferred;
}

async function loadSamplers() {
  try {
    const samplers = await api('/sdapi/v1/samplers');
    fillSelect($('sampler'), samplers, (s) => s.name, (s) => s.name, 'Euler a');
  } catch (err) {
    showError('Loading samplers', err);
  }
  try {
    const schedulers = await api('/sdapi/v1/schedulers');
    fillSelect($('scheduler'), schedulers, (s) => s.name, (s) => s.label || s.name, 'Automatic');
  } catch (err) {
    showError('Loading schedulers', err);
  }
}

async function loadExtrasChoices() {
  let upscalers = [];
  try {
    upscalers = await api('/sdapi/v1/upscalers');
    fillSelect($('upscaler'), upscalers, (u) => u.name, (u) => (u.model_name && u.scale ? `${u.name} (x${u.scale})` : u.name), 'Lanczos');
  } catch (err) {
    showError('Loading upscalers', err);
  }
  // SD upscale takes an index into /sdapi/v1/upscalers (A1111's radio of type "index").
  const lanczos = upscalers.findIndex((u) => u.name === 'Lanczos');
  fillSelect($('sdu-upscaler'), upscalers.map((u, i) => ({ ...u, index: String(i) })), (u) => u.index, (u) => u.name, lanczos >= 0 ? String(lanczos) : '0');
  // Hires fix lists the latent modes first, then the upscalers, as A1111 does.
  let latent = [{ name: 'Latent' }];
  try {
    latent = await api('/sdapi/v1/latent-upscale-modes');
  } catch (err) {
    showError('Loading latent upscale modes', err);
  }
  const hiresNames = [...new Set([...latent.map((m) => m.name), ...upscalers.map((u) => u.name)])];
  fillSelect($('hr-upscaler'), hiresNames, (n) => n, (n) => n, 'Latent');
  try {
    const restorers = await api('/sdapi/v1/face-restorers');
    const select = $('face-restorer');
    fillSelect(select, restorers, (r) => r.name, (r) => r.name);
    select.prepend(el('option', { value: '' }, 'None'));
    if (!restorers.length) select.value = '';
  } catch (err) {
    showError('Loading face restorers', err);
  }
}

// --- generation ---------------------------------------------------------------------------------

/** Reads a number input; a non-number names the field instead of sending NaN. */
function numberField(id, label, integer = true) {
  const raw = $(id).value.trim();
  const value = Number(raw);
  if (raw === '' || !Number.isFinite(value) || (integer && !/^[+-]?\d+$/.test(raw))) {
    throw new Error(`${label} must be ${integer ? 'a whole number' : 'a number'}, got "${raw}"`);
  }
  return value;
}

function collectParams() {
  const params = {
    prompt: $('prompt').value,
    negative_prompt: $('negative-prompt').value,
    sampler_name: $('sampler').value || undefined,
    scheduler: $('scheduler').value || undefined,
    steps: numberField('steps', 'Steps'),
    cfg_scale: numberField('cfg', 'CFG scale', false),
    seed: numberField('seed', 'Seed'),
    width: numberField('width', 'Width'),
    height: numberField('height', 'Height'),
    batch_size: numberField('batch-size', 'Batch size'),
    n_iter: numberField('batch-count', 'Batch count'),
    restore_faces: $('restore-faces').checked,
  };
  if ($('tiling').checked) params.tiling = true;
  Object.assign(params, variationParams());
  if (ui.mode === 'txt2img' && $('hr-enabled').checked) {
    Object.assign(params, {
      enable_hr: true,
      hr_scale: numberField('hr-scale', 'Hires upscale by', false),
      hr_upscaler: $('hr-upscaler').value,
      hr_second_pass_steps: numberField('hr-steps', 'Hires steps'),
      denoising_strength: numberField('hr-denoising', 'Hires denoising strength', false),
    });
  }
  Object.assign(params, scriptParams());
  const refiner = $('refiner-checkpoint').value;
  if (refiner) {
    params.refiner_checkpoint = refiner;
    params.refiner_switch_at = numberField('refiner-switch-at', 'Refiner switch at', false);
  }
  const unit = controlNetUnit();
  if (unit) params.alwayson_scripts = { controlnet: { args: [unit] } };
  if (ui.mode === 'img2img') {
    if (!ui.init) throw new Error('img2img needs an initial image: choose, drop or paste one');
    Object.assign(params, {
      init_images: [base64Of(ui.init.dataUrl)],
      mask: ui.maskPainted ? base64Of(maskPng()) : null,
      denoising_strength: numberField('denoising', 'Denoising strength', false),
      mask_blur: numberField('mask-blur', 'Mask blur'),
      inpainting_fill: Number($('inpainting-fill').value),
      inpaint_full_res: $('inpaint-full-res').checked,
      inpainting_mask_invert: $('mask-invert').checked ? 1 : 0,
    });
  }
  return params;
}

async function generate() {
  let params;
  try {
    params = collectParams();
  } catch (err) {
    showError('Generate', err);
    return;
  }
  const button = $('generate');
  button.disabled = true;
  try {
    const job = await api('/api/v1/jobs', { method: 'POST', body: { kind: ui.mode, params } });
    ui.currentJobId = job.id;
    $('results').replaceChildren();
    renderJob(job);
    followJob(job);
  } catch (err) {
    showError(`Generate (${ui.mode})`, err);
  } finally {
    button.disabled = false;
  }
}

const FINISHED = new Set(['succeeded', 'failed', 'cancelled']);
const SILENT_STREAM_MS = 3000;

/**
 * Follows a job over SSE; if the stream breaks before `done`, polls the job instead. A stream
 * silent for a few seconds (a proxy buffering it, say) is checked by polling too.
 */
function followJob(job) {
  if (ui.followed.has(job.id)) return;
  const id = encodeURIComponent(job.id);
  let finished = false;
  let pollTimer = null;
  let lastHeard = Date.now();
  const watchdog = setInterval(async () => {
    if (finished || pollTimer || Date.now() - lastHeard < SILENT_STREAM_MS) return;
    lastHeard = Date.now();
    try {
      const current = await api(`/api/v1/jobs/${id}`);
      if (FINISHED.has(current.state)) finish(current);
    } catch {
      // The stream or the poller reports lasting problems.
    }
  }, SILENT_STREAM_MS);
  const finish = (final) => {
    if (finished) return;
    finished = true;
    stop();
    jobFinished(final);
  };
  const stop = () => {
    source.close();
    clearTimeout(pollTimer);
    clearInterval(watchdog);
    ui.followed.delete(job.id);
  };
  const poll = async () => {
    try {
      const current = await api(`/api/v1/jobs/${id}`);
      if (FINISHED.has(current.state)) return finish(current);
      if (current.id === ui.currentJobId) renderJob(current);
    } catch (err) {
      showError('Following the job', err);
      if (err.status === 404) return stop();
    }
    if (!finished) pollTimer = setTimeout(poll, 700);
  };
  const source = new EventSource(`/api/v1/jobs/${id}/events`, { withCredentials: true });
  source.addEventListener('state', (event) => {
    lastHeard = Date.now();
    const data = JSON.parse(event.data);
    if (job.id === ui.currentJobId) renderJobState(data.state, data.position);
  });
  source.addEventListener('progress', (event) => {
    lastHeard = Date.now();
    const data = JSON.parse(event.data);
    if (job.id === ui.currentJobId) renderProgress(data.step, data.total_steps, data.eta_seconds, data.preview);
  });
  source.addEventListener('done', (event) => finish(JSON.parse(event.data)));
  source.onerror = () => {
    if (finished) return;
    source.close();
    if (!pollTimer) poll();
  };
  ui.followed.set(job.id, { stop });
}

function renderJobState(state, position) {
  let text;
  if (state === 'queued') text = position === 0 ? 'Queued: next' : position ? `Queued: position ${position + 1}` : 'Queued';
  else if (state === 'running') text = 'Running…';
  else text = { succeeded: 'Done', failed: 'Failed', cancelled: 'Cancelled' }[state] || state;
  $('progress-text').textContent = text;
  $('cancel').disabled = FINISHED.has(state);
}

function renderProgress(step, total, eta, preview) {
  const bar = $('progress');
  bar.max = total || 1;
  bar.value = Math.min(step || 0, bar.max);
  const etaText = eta !== null && eta !== undefined && Number.isFinite(eta) ? ` · ETA ${formatSeconds(eta)}` : '';
  $('progress-text').textContent = `Step ${step}/${total}${etaText}`;
  $('cancel').disabled = false;
  if (preview) {
    const img = $('preview');
    img.src = preview;
    img.hidden = false;
  }
}

function renderJob(job) {
  if (job.state === 'running' && job.total_steps) renderProgress(job.step, job.total_steps, job.eta_seconds, null);
  else renderJobState(job.state, job.position);
  if (job.state === 'queued') {
    $('progress').value = 0;
    $('preview').hidden = true;
  }
}

function jobFinished(job) {
  refreshGalleryIfShown();
  if (job.id !== ui.currentJobId) return;
  $('cancel').disabled = true;
  if (job.images && job.images.length) {
    ui.lastSeed = job.images[0].seed;
    const variation = parseInfotext(job.images[0].infotext).params['Variation seed'];
    ui.lastSubseed = variation === undefined ? null : variation;
  }
  if (job.state === 'succeeded') {
    const bar = $('progress');
    bar.max = job.total_steps || 1;
    bar.value = bar.max;
    const count = (job.images || []).length;
    $('progress-text').textContent = `Done: step ${job.total_steps}/${job.total_steps}, ${count} image${count === 1 ? '' : 's'}`;
    $('preview').hidden = true;
    renderResults(job.images || [], job);
  } else if (job.state === 'failed') {
    $('progress-text').textContent = 'Failed';
    showError('Generation failed', job.error || 'the server gave no reason');
  } else {
    $('progress-text').textContent = 'Cancelled';
  }
}

/** The title of the script whose grids a job's images marked `grid` are (X/Y/Z plot, prompt matrix). */
function gridTitle(job) {
  const name = String((job && job.params && job.params.script_name) || '').trim().toLowerCase();
  return SCRIPT_TITLES[name] || 'Script';
}

function renderResults(images, job) {
  // A script's grids (the server marks them) come first, then its single images; a grid spans
  // the whole row.
  const grid = gridTitle(job);
  // Images the server did not save (ControlNet's detected maps, shown in the panel) have no URL.
  $('results').replaceChildren(
    ...images.map((image) => ({ image, isGrid: image.grid === true })).filter(({ image }) => image.url).map(({ image, isGrid }) =>
      el(
        'figure',
        { class: isGrid ? 'result grid-result' : 'result', dataset: { kind: isGrid ? 'grid' : 'image' } },
        el('a', { href: image.url, target: '_blank', rel: 'noopener' }, el('img', { src: image.url, alt: isGrid ? `${grid} grid` : `Seed ${image.seed}` })),
        el(
          'figcaption',
          {},
          el('span', { class: 'muted' }, isGrid ? `${grid} grid` : `seed ${image.seed}`),
          el('button', { type: 'button', onclick: () => sendToImg2img(image.url, image.infotext) }, 'Send to img2img'),
          el('button', { type: 'button', onclick: () => sendToExtras(image.url) }, 'Send to extras'),
          el('button', { type: 'button', title: 'Use this seed', onclick: () => ($('seed').value = image.seed) }, '♻'),
        ),
        image.infotext ? el('details', {}, el('summary', {}, 'Parameters'), el('pre', { class: 'infotext' }, image.infotext)) : null,
      ),
    ),
  );
}

async function cancelJob(id) {
  try {
    // A running job stops at its next step; its events (or the queue view) then show the end.
    await api(`/api/v1/jobs/${encodeURIComponent(id)}/cancel`, { method: 'POST' });
    if (ui.tab === 'queue') refreshQueue();
  } catch (err) {
    showError('Cancel', err);
  }
}

// --- infotext → controls ------------------------------------------------------------------------

/**
 * Fills the controls from an image's infotext. `txt2img` also sets the hires fix (A1111 pastes
 * it into txt2img only).
 */
function applyInfotext(infotext, { txt2img = false } = {}) {
  if (!infotext) return;
  const { prompt, negative_prompt: negative, params } = parseInfotext(infotext);
  $('prompt').value = prompt;
  $('negative-prompt').value = negative;
  const setNumber = (id, value) => {
    if (value !== undefined && value !== '' && Number.isFinite(Number(value))) $(id).value = Number(value);
  };
  const setOption = (id, value) => {
    if (value && [...$(id).options].some((o) => o.value === value)) $(id).value = value;
  };
  setNumber('steps', params.Steps);
  setNumber('cfg', params['CFG scale']);
  setNumber('seed', params.Seed);
  setOption('sampler', params.Sampler);
  setOption('scheduler', params['Schedule type']);
  if (params.Size) {
    const [w, h] = params.Size.split('x');
    setNumber('width', w);
    setNumber('height', h);
  }
  setNumber('denoising', params['Denoising strength']);
  // Variations and tiling: absent means off, so that the image's own settings come back.
  setNumber('subseed', params['Variation seed'] ?? -1);
  setNumber('subseed-strength', params['Variation seed strength'] ?? 0);
  const [resizeW, resizeH] = String(params['Seed resize from'] || '0x0').split('x');
  setNumber('seed-resize-w', resizeW);
  setNumber('seed-resize-h', resizeH);
  $('tiling').checked = params.Tiling === 'True';
  setNumber('step-cache-interval', params['Step cache interval'] ?? 1);
  setNumber('step-cache-branch', params['Step cache branch'] ?? 0);
  if (txt2img) {
    const hires = params['Hires upscale'] !== undefined || params['Hires upscaler'] !== undefined;
    $('hr-enabled').checked = hires;
    if (hires) {
      setNumber('hr-scale', params['Hires upscale'] ?? 2);
      setOption('hr-upscaler', params['Hires upscaler']);
      setNumber('hr-steps', params['Hires steps'] ?? 0);
      setNumber('hr-denoising', params['Denoising strength']);
    }
  }
  updatePanelStates();
}

// --- img2img: initial image and mask painting ---------------------------------------------------

async function setInitImage(dataUrl) {
  const image = await loadImage(dataUrl);
  ui.init = { dataUrl, width: image.naturalWidth, height: image.naturalHeight };
  const canvas = $('init-canvas');
  const mask = $('mask-canvas');
  for (const c of [canvas, mask]) {
    c.width = image.naturalWidth;
    c.height = image.naturalHeight;
  }
  canvas.getContext('2d').drawImage(image, 0, 0);
  clearMask();
  $('mask-wrap').hidden = false;
  $('init-empty').hidden = true;
  // The output size follows the image, rounded down to the multiple of 8 the networks need.
  $('width').value = Math.max(8, image.naturalWidth - (image.naturalWidth % 8));
  $('height').value = Math.max(8, image.naturalHeight - (image.naturalHeight % 8));
}

function clearMask() {
  const mask = $('mask-canvas');
  mask.getContext('2d').clearRect(0, 0, mask.width, mask.height);
  ui.maskPainted = false;
}

/** The mask as the API wants it: a PNG of the image's size, black = keep, white = repaint. */
function maskPng() {
  const mask = $('mask-canvas');
  const out = document.createElement('canvas');
  out.width = mask.width;
  out.height = mask.height;
  const ctx = out.getContext('2d');
  ctx.fillStyle = '#000';
  ctx.fillRect(0, 0, out.width, out.height);
  ctx.drawImage(mask, 0, 0);
  // Strokes are drawn in opaque white; anti-aliased edges become pure black or white here.
  const pixels = ctx.getImageData(0, 0, out.width, out.height);
  const d = pixels.data;
  for (let i = 0; i < d.length; i += 4) {
    const v = d[i] >= 128 ? 255 : 0;
    d[i] = v;
    d[i + 1] = v;
    d[i + 2] = v;
    d[i + 3] = 255;
  }
  ctx.putImageData(pixels, 0, 0);
  return out.toDataURL('image/png');
}

function brushSize() {
  return Number($('brush-size').value) || 24;
}

function showBrushSize() {
  $('brush-size-value').textContent = String(brushSize());
}

function setupMaskPainting() {
  const mask = $('mask-canvas');
  let drawing = false;
  let last = null;
  const point = (event) => {
    const rect = mask.getBoundingClientRect();
    return {
      x: ((event.clientX - rect.left) * mask.width) / rect.width,
      y: ((event.clientY - rect.top) * mask.height) / rect.height,
    };
  };
  const stroke = (from, to) => {
    const ctx = mask.getContext('2d');
    ctx.strokeStyle = '#fff';
    ctx.fillStyle = '#fff';
    ctx.lineCap = 'round';
    ctx.lineJoin = 'round';
    ctx.lineWidth = brushSize();
    ctx.beginPath();
    ctx.moveTo(from.x, from.y);
    ctx.lineTo(to.x, to.y);
    ctx.stroke();
    ctx.beginPath();
    ctx.arc(to.x, to.y, brushSize() / 2, 0, Math.PI * 2);
    ctx.fill();
    ui.maskPainted = true;
  };
  mask.addEventListener('pointerdown', (event) => {
    if (!ui.init) return;
    drawing = true;
    mask.setPointerCapture(event.pointerId);
    last = point(event);
    stroke(last, last);
    event.preventDefault();
  });
  mask.addEventListener('pointermove', (event) => {
    if (!drawing) return;
    const next = point(event);
    stroke(last, next);
    last = next;
  });
  const end = () => {
    drawing = false;
    last = null;
  };
  mask.addEventListener('pointerup', end);
  mask.addEventListener('pointercancel', end);
  $('mask-clear').addEventListener('click', clearMask);
  $('brush-size').addEventListener('input', showBrushSize);
}

async function takeImageFile(file, target) {
  if (!file) return;
  if (!file.type.startsWith('image/')) {
    showError('Image', `${file.name || 'the file'} is not an image (${file.type || 'unknown type'})`);
    return;
  }
  try {
    const dataUrl = await readFileAsDataUrl(file);
    if (target === 'extras') await setExtrasImage(dataUrl);
    else await setInitImage(dataUrl);
  } catch (err) {
    showError('Image', err);
  }
}

function setupImageInputs() {
  $('init-file').addEventListener('change', (event) => takeImageFile(event.target.files[0], 'img2img'));
  const drop = $('init-drop');
  drop.addEventListener('dragover', (event) => {
    event.preventDefault();
    drop.classList.add('dragging');
  });
  drop.addEventListener('dragleave', () => drop.classList.remove('dragging'));
  drop.addEventListener('drop', (event) => {
    event.preventDefault();
    drop.classList.remove('dragging');
    takeImageFile(event.dataTransfer.files[0], 'img2img');
  });
  document.addEventListener('paste', (event) => {
    if (ui.tab !== 'img2img' && ui.tab !== 'extras') return;
    const item = [...(event.clipboardData?.items || [])].find((i) => i.type.startsWith('image/'));
    if (item) takeImageFile(item.getAsFile(), ui.tab === 'extras' ? 'extras' : 'img2img');
  });
  $('extras-file').addEventListener('change', (event) => takeImageFile(event.target.files[0], 'extras'));
  $('pnginfo-file').addEventListener('change', (event) => readPngInfo(event.target.files[0]));
}

async function sendToImg2img(url, infotext) {
  try {
    const dataUrl = await fetchImageAsDataUrl(url);
    selectTab('img2img');
    await setInitImage(dataUrl);
    applyInfotext(infotext);
  } catch (err) {
    showError('Send to img2img', err);
  }
}

// --- extras -------------------------------------------------------------------------------------

async function setExtrasImage(dataUrl) {
  await loadImage(dataUrl);
  ui.extrasImage = dataUrl;
  const img = $('extras-input');
  img.src = dataUrl;
  img.hidden = false;
}

async function sendToExtras(url) {
  try {
    const dataUrl = await fetchImageAsDataUrl(url);
    selectTab('extras');
    await setExtrasImage(dataUrl);
  } catch (err) {
    showError('Send to extras', err);
  }
}

async function runExtras() {
  if (!ui.extrasImage) {
    showError('Extras', 'choose an image first');
    return;
  }
  const button = $('extras-run');
  button.disabled = true;
  $('extras-info').textContent = 'Working…';
  try {
    const restorer = $('face-restorer').value;
    const visibility = numberField('face-visibility', 'Face restore visibility', false);
    const body = {
      image: base64Of(ui.extrasImage),
      resize_mode: 0,
      upscaling_resize: numberField('upscale-factor', 'Scale', false),
      upscaler_1: $('upscaler').value || 'None',
      gfpgan_visibility: /gfpgan/i.test(restorer) ? visibility : 0,
      codeformer_visibility: /codeformer/i.test(restorer) ? visibility : 0,
    };
    const result = await api('/sdapi/v1/extra-single-image', { method: 'POST', body });
    const out = $('extras-output');
    out.src = result.image.startsWith('data:') ? result.image : `data:image/png;base64,${result.image}`;
    out.hidden = false;
    // html_info is A1111's HTML; read its text in an inert document (no scripts, no loads).
    const info = new DOMParser().parseFromString(result.html_info || '', 'text/html').body.textContent.trim();
    $('extras-info').textContent = info || 'Done';
  } catch (err) {
    $('extras-info').textContent = '';
    showError('Extras', err);
  } finally {
    button.disabled = false;
  }
}

async function readPngInfo(file) {
  if (!file) return;
  try {
    const dataUrl = await readFileAsDataUrl(file);
    const result = await api('/sdapi/v1/png-info', { method: 'POST', body: { image: dataUrl } });
    $('pnginfo-text').textContent = result.info || '(this PNG has no generation parameters)';
  } catch (err) {
    showError('PNG info', err);
  }
}

// --- queue --------------------------------------------------------------------------------------

function renderQueueSummary(status) {
  const q = (status && status.queue) || {};
  $('queue-summary').textContent = `${q.running ?? 0} running, ${q.queued ?? 0} waiting, capacity ${q.capacity ?? '?'}`;
}

async function refreshQueue() {
  try {
    const { jobs } = await api('/api/v1/jobs');
    renderQueueSummary(ui.status);
    $('queue-table').tBodies[0].replaceChildren(
      ...jobs.map((job) => {
        let progress = '';
        if (job.state === 'queued') progress = job.position === null || job.position === undefined ? '' : `#${job.position + 1} in line`;
        else if (job.total_steps) progress = `${job.step}/${job.total_steps}${job.eta_seconds ? ` · ETA ${formatSeconds(job.eta_seconds)}` : ''}`;
        const cancellable = job.state === 'queued' || job.state === 'running';
        return el(
          'tr',
          { dataset: { state: job.state } },
          el('td', { class: 'mono' }, job.id.slice(0, 8)),
          el('td', {}, job.kind),
          el('td', {}, job.state, job.error ? el('div', { class: 'error-text' }, job.error) : null),
          el('td', {}, progress),
          el('td', {}, job.created ? new Date(job.created).toLocaleTimeString() : ''),
          el('td', {}, cancellable ? el('button', { type: 'button', onclick: () => cancelJob(job.id) }, 'Cancel') : null),
        );
      }),
    );
  } catch (err) {
    showError('Queue', err);
  }
}

// --- gallery ------------------------------------------------------------------------------------

function refreshGalleryIfShown() {
  if (ui.tab === 'gallery') refreshGallery();
}

async function refreshGallery() {
  try {
    const data = await api(`/api/v1/gallery?page=${ui.galleryPage}&per_page=${ui.galleryPerPage}`);
    const pages = Math.max(1, Math.ceil(data.total / data.per_page));
    $('gallery-page').textContent = `Page ${data.page} of ${pages} · ${data.total} image${data.total === 1 ? '' : 's'}`;
    $('gallery-prev').disabled = data.page <= 1;
    $('gallery-next').disabled = data.page >= pages;
    $('gallery').replaceChildren(
      ...data.items.map((item) =>
        el(
          'button',
          { type: 'button', class: 'gallery-item', title: item.name, dataset: { name: item.name }, onclick: () => showGalleryItem(item) },
          el('img', { src: item.url, alt: item.name, loading: 'lazy', width: item.width, height: item.height }),
        ),
      ),
    );
    if (!data.items.length) $('gallery').append(el('p', { class: 'muted' }, 'No images yet.'));
  } catch (err) {
    showError('Gallery', err);
  }
}

function showGalleryItem(item) {
  ui.gallerySelected = item;
  $('gallery-detail').hidden = false;
  $('gallery-image').src = item.url;
  $('gallery-name').textContent = `${item.name} · ${item.width}×${item.height}`;
  $('gallery-info').textContent = item.infotext || '(no generation parameters)';
  $('gallery-detail').scrollIntoView({ block: 'nearest' });
}

// --- embeddings ---------------------------------------------------------------------------------

async function refreshEmbeddings() {
  try {
    const data = await api('/sdapi/v1/embeddings');
    const entry = (name, e, loaded) => {
      const detail = [];
      if (e && e.vectors) detail.push(`${e.vectors} vector${e.vectors === 1 ? '' : 's'}`);
      if (e && e.shape) detail.push(`dim ${e.shape}`);
      if (e && e.step) detail.push(`step ${e.step}`);
      if (e && e.sd_checkpoint_name) detail.push(`trained on ${e.sd_checkpoint_name}`);
      if (e && e.reason) detail.push(e.reason);
      return el(
        'li',
        {},
        loaded
          ? el('button', { type: 'button', class: 'link', title: 'Append to the prompt', onclick: () => appendToPrompt(name) }, name)
          : el('span', {}, name),
        detail.length ? el('span', { class: 'muted' }, ` ${detail.join(' · ')}`) : null,
      );
    };
    const loaded = Object.entries(data.loaded || {});
    const skipped = Object.entries(data.skipped || {});
    $('embeddings-loaded').replaceChildren(...(loaded.length ? loaded.map(([n, e]) => entry(n, e, true)) : [el('li', { class: 'muted' }, 'none')]));
    $('embeddings-skipped').replaceChildren(...(skipped.length ? skipped.map(([n, e]) => entry(n, e, false)) : [el('li', { class: 'muted' }, 'none')]));
  } catch (err) {
    showError('Embeddings', err);
  }
}

// --- ControlNet ---------------------------------------------------------------------------------

/** The preprocessors and models the server offers (sd-webui-controlnet's API). */
async function loadControlNet() {
  try {
    const [modules, models] = await Promise.all([api('/controlnet/module_list'), api('/controlnet/model_list')]);
    $('cn-module').replaceChildren(...modules.module_list.map((m) => el('option', { value: m }, m)));
    const names = models.model_list;
    $('cn-model').replaceChildren(...(names.length ? names.map((m) => el('option', { value: m }, m)) : [el('option', { value: '' }, 'none in --controlnet-dirs')]));
  } catch (err) {
    showError('ControlNet', err);
  }
}

/** The unit the panel describes, or null when ControlNet is off. */
function controlNetUnit() {
  if (!$('cn-enabled').checked) return null;
  if (!ui.controlImage) throw new Error('ControlNet is enabled but has no control image: choose one');
  if (!$('cn-model').value) throw new Error('ControlNet is enabled but the server has no ControlNet model');
  return {
    image: base64Of(ui.controlImage),
    module: $('cn-module').value || 'none',
    model: $('cn-model').value,
    weight: numberField('cn-weight', 'ControlNet weight', false),
    control_mode: $('cn-mode').value,
  };
}

async function setControlImage(file) {
  try {
    ui.controlImage = await readFileAsDataUrl(file);
    $('cn-input').src = ui.controlImage;
    $('cn-input').hidden = false;
    $('cn-map').hidden = true;
  } catch (err) {
    showError('ControlNet image', err);
  }
}

/** Runs the preprocessor on the control image and shows the map (`/controlnet/detect`). */
async function previewControlMap() {
  try {
    if (!ui.controlImage) throw new Error('choose a control image first');
    const result = await api('/controlnet/detect', {
      method: 'POST',
      body: { controlnet_module: $('cn-module').value || 'none', controlnet_input_images: [base64Of(ui.controlImage)] },
    });
    $('cn-map').src = `data:image/png;base64,${result.images[0]}`;
    $('cn-map').hidden = false;
  } catch (err) {
    showError('ControlNet preview', err);
  }
}

// --- variation seed, hires fix ------------------------------------------------------------------

/** The variation seed fields to send: only what differs from "off", as A1111's Extra does. */
function variationParams() {
  const out = {};
  const strength = numberField('subseed-strength', 'Variation strength', false);
  if (strength !== 0) {
    out.subseed = numberField('subseed', 'Variation seed');
    out.subseed_strength = strength;
  }
  const width = numberField('seed-resize-w', 'Resize seed from width');
  const height = numberField('seed-resize-h', 'Resize seed from height');
  // A1111 resizes the seed only when both sides are set.
  if (width > 0 && height > 0) {
    out.seed_resize_from_w = width;
    out.seed_resize_from_h = height;
  }
  // sdkube's step-cache settings, per request (1 = off: the server's options apply then).
  const interval = numberField('step-cache-interval', 'Step cache every N steps');
  if (interval !== 1) {
    out.override_settings = {
      step_cache_interval: interval,
      step_cache_branch: numberField('step-cache-branch', 'Step cache branch'),
    };
  }
  return out;
}

/** What a closed panel does, in its summary; the hires fix's target size. */
function updatePanelStates() {
  const number = (id) => Number($(id).value);
  const extra = [];
  if (number('subseed-strength')) extra.push(`strength ${number('subseed-strength')}`);
  if (number('seed-resize-w') > 0 && number('seed-resize-h') > 0) extra.push(`from ${number('seed-resize-w')}×${number('seed-resize-h')}`);
  if (number('step-cache-interval') > 1) extra.push(`step cache every ${number('step-cache-interval')}, branch ${number('step-cache-branch')}`);
  $('extra-state').textContent = extra.length ? `· ${extra.join(', ')}` : '';
  const enabled = $('hr-enabled').checked;
  $('hires-state').textContent = enabled ? `· on, ×${$('hr-scale').value} ${$('hr-upscaler').value}` : '';
  // sdkube's hires size: each side times the scale, rounded down to a multiple of 8.
  const side = (v) => Math.floor(Math.floor(v * number('hr-scale')) / 8) * 8;
  const [w, h] = [number('width'), number('height')];
  $('hr-size').textContent = w > 0 && h > 0 && number('hr-scale') > 0 ? `From ${w}×${h} to ${side(w)}×${side(h)}` : '';
}

// --- scripts: X/Y/Z plot, prompt matrix, SD upscale ---------------------------------------------

/** The scripts the UI has controls for, by A1111's lower-case names, with their titles. */
const SCRIPT_TITLES = { 'prompt matrix': 'Prompt matrix', 'sd upscale': 'SD upscale', 'x/y/z plot': 'X/Y/Z plot' };
const SCRIPT_PANELS = { 'prompt matrix': 'script-matrix', 'sd upscale': 'script-sdupscale', 'x/y/z plot': 'script-xyz' };
const XYZ_AXES = ['x', 'y', 'z'];
/** Axis labels the server takes as they are, should /sdapi/v1/script-info list none. */
const XYZ_FALLBACK_AXES = ['Nothing', 'Seed', 'Var. seed', 'Var. strength', 'Steps', 'CFG Scale', 'Prompt S/R', 'Sampler', 'Checkpoint name', 'Schedule type', 'Clip skip', 'Denoising', 'Size'];

async function loadScripts() {
  try {
    const [scripts, info] = await Promise.all([api('/sdapi/v1/scripts'), api('/sdapi/v1/script-info')]);
    ui.scripts = scripts;
    ui.scriptInfo = info;
  } catch (err) {
    showError('Loading scripts', err);
  }
  renderScriptChoices();
}

/** The script select of the current tab (the server's list) and the X/Y/Z axes. */
function renderScriptChoices() {
  const select = $('script-name');
  const previous = select.value;
  const names = ((ui.scripts && ui.scripts[ui.mode]) || []).filter((name) => SCRIPT_PANELS[name]);
  select.replaceChildren(el('option', { value: '' }, 'None'), ...names.map((name) => el('option', { value: name }, SCRIPT_TITLES[name])));
  select.value = names.includes(previous) ? previous : '';
  fillAxisSelects();
  showScriptControls();
}

function showScriptControls() {
  const name = $('script-name').value;
  for (const [script, id] of Object.entries(SCRIPT_PANELS)) $(id).hidden = script !== name;
}

/**
 * The X/Y/Z axis types of a tab. From /sdapi/v1/script-info they are sent as A1111 sends
 * them, as indices into that list; the fallback list is sent by label.
 */
function xyzAxes(mode) {
  const info = (ui.scriptInfo || []).find((s) => s.name === 'x/y/z plot' && Boolean(s.is_img2img) === (mode === 'img2img'));
  const args = (info && info.args) || [];
  if (args[0] && Array.isArray(args[0].choices) && args[0].choices.length) {
    return { labels: args[0].choices, byIndex: true, defaults: [0, 3, 6].map((i) => args[i] && args[i].value) };
  }
  return { labels: XYZ_FALLBACK_AXES, byIndex: false, defaults: ['Seed', 'Nothing', 'Nothing'] };
}

function fillAxisSelects() {
  const { labels, byIndex, defaults } = xyzAxes(ui.mode);
  XYZ_AXES.forEach((axis, k) => {
    const select = $(`xyz-${axis}-type`);
    const previous = select.selectedOptions[0] ? select.selectedOptions[0].textContent : null;
    select.replaceChildren(...labels.map((label, i) => el('option', { value: byIndex ? String(i) : label }, label)));
    select.dataset.byIndex = String(byIndex);
    const wanted = [previous, defaults[k], 'Nothing'].find((label) => labels.includes(label));
    select.selectedIndex = Math.max(0, labels.indexOf(wanted));
    showAxisHint(axis);
  });
}

/** An example of the values an axis takes, from the server's lists where it has one. */
function axisExample(label) {
  const listed = (id) => [...$(id).options].map((o) => o.textContent).filter(Boolean).slice(0, 3).join(', ');
  const examples = {
    Seed: '1, 2, 3 (-1: random)',
    'Var. seed': '1, 2, 3',
    'Var. strength': '0, 0.25, 0.5',
    Steps: '10, 20, 30 or 10-30 (+10)',
    'Hires steps': '5, 10',
    'CFG Scale': '5, 7.5, 10',
    'Prompt S/R': 'the prompt\'s words, then their replacements',
    'Clip skip': '1, 2',
    Denoising: '0.3, 0.5, 0.7',
    Size: '512x512, 768x512',
    Sampler: listed('sampler'),
    'Checkpoint name': listed('model'),
    'Schedule type': listed('scheduler'),
    'Hires upscaler': listed('hr-upscaler'),
  };
  if (label === 'Nothing') return '';
  return label in examples ? examples[label] : 'values, separated by commas';
}

function showAxisHint(axis) {
  const select = $(`xyz-${axis}-type`);
  const label = select.selectedOptions[0] ? select.selectedOptions[0].textContent : '';
  $(`xyz-${axis}-values`).placeholder = axisExample(label);
}

function axisType(axis) {
  const select = $(`xyz-${axis}-type`);
  return select.dataset.byIndex === 'true' ? Number(select.value) : select.value;
}

/**
 * `script_name` and `script_args` of the chosen script: A1111 1.10's positional lists. The
 * X/Y/Z values are typed text, so "Use text inputs instead of dropdowns" (csv_mode) is on.
 */
function scriptParams() {
  const name = $('script-name').value;
  if (!name) return {};
  const checked = (id) => $(id).checked;
  let args;
  if (name === 'x/y/z plot') {
    args = [
      ...XYZ_AXES.flatMap((axis) => [axisType(axis), $(`xyz-${axis}-values`).value, []]),
      checked('xyz-legend'), // draw_legend
      checked('xyz-sub-images'), // include_lone_images
      checked('xyz-sub-grids'), // include_sub_grids
      checked('xyz-keep-seeds'), // no_fixed_seeds
      false, // vary_seeds_x
      false, // vary_seeds_y
      false, // vary_seeds_z
      numberField('xyz-margin', 'Grid margins (px)'), // margin_size
      true, // csv_mode
    ];
  } else if (name === 'prompt matrix') {
    args = [
      checked('matrix-start'), // put_at_start
      checked('matrix-seeds'), // different_seeds
      $('matrix-prompt-type').value, // prompt_type
      $('matrix-delimiter').value, // variations_delimiter
      numberField('matrix-margin', 'Grid margins (px)'), // margin_size
    ];
  } else if (name === 'sd upscale') {
    args = [
      '', // A1111's info text
      numberField('sdu-overlap', 'Tile overlap'), // overlap
      Number($('sdu-upscaler').value || 0), // upscaler_index
      numberField('sdu-scale', 'Scale Factor', false), // scale_factor
    ];
  } else {
    return {};
  }
  return { script_name: name, script_args: args };
}

// --- LoRA ---------------------------------------------------------------------------------------

async function refreshLoras() {
  try {
    await api('/sdapi/v1/refresh-loras', { method: 'POST' });
    const list = await api('/sdapi/v1/loras');
    const entry = (l) => {
      const meta = l.metadata || {};
      const detail = [];
      if (l.alias && l.alias !== l.name) detail.push(`alias ${l.alias}`);
      if (meta.ss_base_model_version) detail.push(meta.ss_base_model_version);
      if (meta.ss_network_dim) detail.push(`rank ${meta.ss_network_dim}`);
      return el(
        'li',
        {},
        el('button', { type: 'button', class: 'link', title: 'Add to the prompt', onclick: () => addTag(`<lora:${l.name}:1>`) }, l.name),
        detail.length ? el('span', { class: 'muted' }, ` ${detail.join(' · ')}`) : null,
      );
    };
    $('loras-list').replaceChildren(...(list.length ? list.map(entry) : [el('li', { class: 'muted' }, 'none')]));
  } catch (err) {
    showError('LoRA', err);
  }
}

/** Adds an extra-network tag at the end of the prompt, space-separated as A1111 does. */
function addTag(tag) {
  const prompt = $('prompt');
  prompt.value = prompt.value.trim() ? `${prompt.value.replace(/\s+$/, '')} ${tag}` : tag;
  selectTab(ui.mode);
  prompt.focus();
}

function appendToPrompt(text) {
  const prompt = $('prompt');
  prompt.value = prompt.value.trim() ? `${prompt.value.replace(/\s+$/, '')}, ${text}` : text;
  selectTab(ui.mode);
  prompt.focus();
}

// --- wiring -------------------------------------------------------------------------------------

function startUi() {
  setApiKeyCookie(storedApiKey());
  for (const button of document.querySelectorAll('.tabs [data-tab]')) {
    button.addEventListener('click', () => selectTab(button.dataset.tab));
  }
  $('generate').addEventListener('click', generate);
  $('cancel').addEventListener('click', () => ui.currentJobId && cancelJob(ui.currentJobId));
  $('seed-random').addEventListener('click', () => ($('seed').value = -1));
  $('seed-reuse').addEventListener('click', () => {
    if (ui.lastSeed === null || ui.lastSeed === undefined) showError('Seed', 'no image generated yet: nothing to reuse');
    else $('seed').value = ui.lastSeed;
  });
  $('model').addEventListener('change', switchModel);
  $('extras-run').addEventListener('click', runExtras);
  $('gallery-prev').addEventListener('click', () => {
    ui.galleryPage = Math.max(1, ui.galleryPage - 1);
    refreshGallery();
  });
  $('gallery-next').addEventListener('click', () => {
    ui.galleryPage += 1;
    refreshGallery();
  });
  $('gallery-refresh').addEventListener('click', refreshGallery);
  $('gallery-to-img2img').addEventListener('click', () => ui.gallerySelected && sendToImg2img(ui.gallerySelected.url, ui.gallerySelected.infotext));
  $('gallery-to-extras').addEventListener('click', () => ui.gallerySelected && sendToExtras(ui.gallerySelected.url));
  $('gallery-to-txt2img').addEventListener('click', () => {
    if (!ui.gallerySelected) return;
    applyInfotext(ui.gallerySelected.infotext, { txt2img: true });
    selectTab('txt2img');
  });
  $('embeddings-refresh').addEventListener('click', refreshEmbeddings);
  $('loras-refresh').addEventListener('click', refreshLoras);
  $('cn-file').addEventListener('change', () => $('cn-file').files[0] && setControlImage($('cn-file').files[0]));
  $('cn-preview').addEventListener('click', previewControlMap);
  $('controlnet-panel').addEventListener('toggle', () => $('controlnet-panel').open && loadControlNet(), { once: true });
  $('subseed-random').addEventListener('click', () => ($('subseed').value = -1));
  $('subseed-reuse').addEventListener('click', () => {
    if (ui.lastSubseed === null || ui.lastSubseed === undefined) showError('Variation seed', 'the last image has no variation seed: nothing to reuse');
    else $('subseed').value = ui.lastSubseed;
  });
  for (const id of ['subseed-strength', 'seed-resize-w', 'seed-resize-h', 'step-cache-interval', 'step-cache-branch', 'hr-enabled', 'hr-scale', 'hr-upscaler', 'width', 'height']) {
    $(id).addEventListener('input', updatePanelStates);
    $(id).addEventListener('change', updatePanelStates);
  }
  $('script-name').addEventListener('change', showScriptControls);
  for (const axis of XYZ_AXES) $(`xyz-${axis}-type`).addEventListener('change', () => showAxisHint(axis));
  document.addEventListener('keydown', (event) => {
    if ((event.ctrlKey || event.metaKey) && event.key === 'Enter') {
      event.preventDefault();
      if (ui.tab !== 'txt2img' && ui.tab !== 'img2img') selectTab(ui.mode);
      generate();
    }
  });
  setupMaskPainting();
  setupImageInputs();
  selectTab('txt2img');
  refreshStatus();
  loadModels();
  loadSamplers();
  loadExtrasChoices().then(updatePanelStates);
  loadScripts();
  updatePanelStates();
}

// ---------------------------------------------------------------------------------------------
// The API docs page, built from /openapi.json
// ---------------------------------------------------------------------------------------------

const HTTP_METHODS = ['get', 'put', 'post', 'delete', 'options', 'head', 'patch', 'trace'];

/** Follows a local `$ref` (`#/components/schemas/Name`) in the document. */
function resolveRef(doc, ref) {
  if (typeof ref !== 'string' || !ref.startsWith('#/')) return null;
  let node = doc;
  for (const part of ref.slice(2).split('/')) {
    node = node && node[part.replace(/~1/g, '/').replace(/~0/g, '~')];
  }
  return node || null;
}

function refName(ref) {
  return ref.split('/').pop();
}

/** A one-line type description: `string`, `integer | null`, `array of Job`, `Job`. */
function typeLabel(doc, schema) {
  if (!schema) return 'any';
  if (schema.$ref) return refName(schema.$ref);
  const variants = schema.oneOf || schema.anyOf;
  if (variants) return variants.map((s) => typeLabel(doc, s)).join(' | ');
  if (schema.allOf && schema.allOf.length === 1) return typeLabel(doc, schema.allOf[0]);
  let types = Array.isArray(schema.type) ? schema.type : schema.type ? [schema.type] : [];
  types = types.map((t) => (t === 'array' ? `array of ${typeLabel(doc, schema.items)}` : t));
  if (schema.enum) return schema.enum.map((v) => JSON.stringify(v)).join(' | ');
  if (schema.const !== undefined) return JSON.stringify(schema.const);
  let label = types.join(' | ') || (schema.properties ? 'object' : 'any');
  if (schema.format) label += ` (${schema.format})`;
  return label;
}

/** Renders a schema as a nested list of properties, following `$ref`s once per branch. */
function renderSchema(doc, schema, seen = new Set(), depth = 0) {
  if (!schema) return el('span', { class: 'muted' }, 'any');
  if (schema.$ref) {
    const name = refName(schema.$ref);
    const target = resolveRef(doc, schema.$ref);
    if (!target || seen.has(name) || depth > 8) return el('span', { class: 'type' }, name);
    const inner = new Set(seen).add(name);
    return el('div', { class: 'schema' }, el('span', { class: 'type' }, name), target.description ? el('p', { class: 'muted' }, target.description) : null, renderSchemaBody(doc, target, inner, depth + 1));
  }
  return el('div', { class: 'schema' }, renderSchemaBody(doc, schema, seen, depth));
}

function renderSchemaBody(doc, schema, seen, depth) {
  const variants = schema.oneOf || schema.anyOf;
  if (variants) {
    return el('div', {}, el('span', { class: 'muted' }, schema.oneOf ? 'one of:' : 'any of:'), el('ul', {}, variants.map((v) => el('li', {}, renderSchema(doc, v, seen, depth + 1)))));
  }
  if (schema.allOf) return el('div', {}, schema.allOf.map((s) => renderSchema(doc, s, seen, depth + 1)));
  const types = Array.isArray(schema.type) ? schema.type : [schema.type];
  if (types.includes('array') && schema.items) {
    return el('div', {}, el('span', { class: 'type' }, 'array of'), renderSchema(doc, schema.items, seen, depth + 1));
  }
  if (schema.properties) {
    const required = new Set(schema.required || []);
    return el(
      'ul',
      { class: 'props' },
      Object.entries(schema.properties).map(([name, prop]) => {
        const nested = prop.$ref || prop.properties || prop.items || prop.oneOf || prop.anyOf || prop.allOf;
        const target = prop.$ref ? resolveRef(doc, prop.$ref) : null;
        const description = prop.description || (target && target.description);
        return el(
          'li',
          {},
          el('code', { class: 'prop' }, name),
          required.has(name) ? el('span', { class: 'required', title: 'required' }, '*') : null,
          ' ',
          el('span', { class: 'type' }, typeLabel(doc, prop)),
          prop.default !== undefined ? el('span', { class: 'muted' }, ` = ${JSON.stringify(prop.default)}`) : null,
          description ? el('div', { class: 'muted' }, description) : null,
          nested && depth < 6 && !(prop.$ref && seen.has(refName(prop.$ref)))
            ? el('details', {}, el('summary', {}, 'fields'), renderSchema(doc, prop, seen, depth + 1))
            : null,
        );
      }),
    );
  }
  if (schema.additionalProperties && typeof schema.additionalProperties === 'object') {
    return el('div', {}, el('span', { class: 'type' }, 'map of string →'), renderSchema(doc, schema.additionalProperties, seen, depth + 1));
  }
  return el('span', { class: 'type' }, typeLabel(doc, schema));
}

/** An example value for a request body: examples and defaults first, then required fields. */
function exampleFor(doc, schema, depth = 0) {
  if (!schema || depth > 8) return null;
  if (schema.example !== undefined) return schema.example;
  if (Array.isArray(schema.examples) && schema.examples.length) return schema.examples[0];
  if (schema.default !== undefined) return schema.default;
  if (schema.$ref) return exampleFor(doc, resolveRef(doc, schema.$ref), depth + 1);
  const variants = schema.oneOf || schema.anyOf;
  if (variants) {
    const nonNull = variants.find((v) => v.type !== 'null');
    return exampleFor(doc, nonNull || variants[0], depth + 1);
  }
  if (schema.allOf) return Object.assign({}, ...schema.allOf.map((s) => exampleFor(doc, s, depth + 1)));
  if (schema.enum) return schema.enum[0];
  const types = Array.isArray(schema.type) ? schema.type : [schema.type];
  const type = types.find((t) => t && t !== 'null') || types[0];
  if (schema.properties || type === 'object') {
    const out = {};
    const required = new Set(schema.required || []);
    const props = Object.entries(schema.properties || {});
    const chosen = props.filter(([name, p]) => required.has(name) || p.default !== undefined || p.example !== undefined);
    for (const [name, prop] of chosen.length ? chosen : props) out[name] = exampleFor(doc, prop, depth + 1);
    return out;
  }
  switch (type) {
    case 'array':
      return [];
    case 'string':
      return '';
    case 'integer':
    case 'number':
      return 0;
    case 'boolean':
      return false;
    default:
      return null;
  }
}

function jsonContent(content) {
  if (!content) return null;
  return content['application/json'] || Object.values(content)[0] || null;
}

function renderOperation(doc, path, method, op) {
  const params = [...(doc.paths[path].parameters || []), ...(op.parameters || [])].map((p) => (p.$ref ? resolveRef(doc, p.$ref) : p)).filter(Boolean);
  const body = op.requestBody && (op.requestBody.$ref ? resolveRef(doc, op.requestBody.$ref) : op.requestBody);
  const bodyContent = body && jsonContent(body.content);
  const id = `op-${method}-${path}`.replace(/[^\w-]+/g, '-');
  const responses = Object.entries(op.responses || {}).map(([code, r]) => {
    const response = r.$ref ? resolveRef(doc, r.$ref) : r;
    const content = response && jsonContent(response.content);
    return el(
      'li',
      {},
      el('code', { class: `status s${code[0]}` }, code),
      ' ',
      (response && response.description) || '',
      content && content.schema ? el('details', {}, el('summary', {}, 'schema'), renderSchema(doc, content.schema)) : null,
    );
  });

  const paramInputs = params.map((p) =>
    el(
      'label',
      { class: 'field' },
      el('span', {}, `${p.name} (${p.in}${p.required ? ', required' : ''})`),
      el('input', { type: 'text', dataset: { name: p.name, in: p.in }, placeholder: p.schema ? typeLabel(doc, p.schema) : '' }),
    ),
  );
  const bodyInput = bodyContent
    ? el('textarea', { class: 'mono', rows: 8, 'aria-label': 'Request body (JSON)' }, JSON.stringify(exampleFor(doc, bodyContent.schema), null, 2))
    : null;
  const output = el('div', { class: 'try-output' });
  const send = el('button', { type: 'button', class: 'primary' }, 'Send');
  send.addEventListener('click', () => tryOperation(path, method, paramInputs, bodyInput, output, send));

  return el(
    'details',
    { class: 'op', id, dataset: { method, path } },
    el('summary', {}, el('span', { class: `method m-${method}` }, method.toUpperCase()), ' ', el('code', { class: 'path' }, path), op.summary ? el('span', { class: 'muted' }, ` ${op.summary}`) : null),
    op.description && op.description !== op.summary ? el('p', { class: 'description' }, op.description) : null,
    params.length
      ? el('div', {}, el('h4', {}, 'Parameters'), el('ul', { class: 'props' }, params.map((p) => el('li', {}, el('code', { class: 'prop' }, p.name), p.required ? el('span', { class: 'required' }, '*') : null, ` ${p.in} · `, el('span', { class: 'type' }, typeLabel(doc, p.schema)), p.description ? el('div', { class: 'muted' }, p.description) : null))))
      : null,
    bodyContent ? el('div', {}, el('h4', {}, `Request body${body.required ? '' : ' (optional)'}`), renderSchema(doc, bodyContent.schema)) : null,
    el('h4', {}, 'Responses'),
    el('ul', { class: 'responses' }, responses),
    el('div', { class: 'try' }, el('h4', {}, 'Try it'), paramInputs, bodyInput, el('div', { class: 'actions' }, send), output),
  );
}

async function tryOperation(path, method, paramInputs, bodyInput, output, button) {
  let url = path;
  const query = new URLSearchParams();
  const headers = { ...authHeaders() };
  for (const input of paramInputs.map((label) => label.querySelector('input'))) {
    const { name, in: where } = input.dataset;
    const value = input.value;
    if (where === 'path') url = url.replace(`{${name}}`, encodeURIComponent(value));
    else if (where === 'query' && value !== '') query.set(name, value);
    else if (where === 'header' && value !== '') headers[name] = value;
  }
  if ([...query].length) url += `?${query}`;
  let body;
  if (bodyInput) {
    body = bodyInput.value;
    try {
      JSON.parse(body);
    } catch (err) {
      // Sent anyway: seeing how the server answers malformed JSON is a valid use of "Try it".
      output.replaceChildren(el('p', { class: 'muted' }, `note: the body is not valid JSON (${err.message})`));
    }
    headers['Content-Type'] = 'application/json';
  }
  button.disabled = true;
  const started = performance.now();
  const controller = new AbortController();
  const stop = el('button', { type: 'button', onclick: () => controller.abort() }, 'Stop');
  output.append(stop);
  try {
    const response = await fetch(url, { method: method.toUpperCase(), headers, body, signal: controller.signal, credentials: 'same-origin' });
    const type = response.headers.get('content-type') || '';
    const head = el('p', { class: 'response-status' }, el('code', { class: `status s${String(response.status)[0]}` }, String(response.status)), ` ${response.statusText} · ${type} · ${Math.round(performance.now() - started)} ms`);
    let content;
    if (type.startsWith('image/')) {
      content = el('img', { src: URL.createObjectURL(await response.blob()), alt: 'response image', class: 'thumb-large' });
    } else {
      const text = await response.text();
      let shown = text;
      try {
        shown = JSON.stringify(JSON.parse(text), null, 2);
      } catch {
        // not JSON: show as is
      }
      content = el('pre', { class: 'response-body' }, shown.length > 200000 ? `${shown.slice(0, 200000)}\n… (${shown.length} characters)` : shown);
    }
    output.replaceChildren(head, content);
  } catch (err) {
    output.replaceChildren(el('p', { class: 'error-text' }, err.name === 'AbortError' ? 'stopped' : `request failed: ${err.message}`));
  } finally {
    button.disabled = false;
  }
}

async function startDocs() {
  const root = $('docs-root');
  const keyInput = $('docs-key');
  keyInput.value = storedApiKey();
  keyInput.addEventListener('change', () => storeApiKey(keyInput.value.trim()));
  let doc;
  try {
    doc = await api('/openapi.json');
  } catch (err) {
    root.replaceChildren(el('p', { class: 'error' }, `Cannot load /openapi.json: ${err.message}`));
    return;
  }
  const info = doc.info || {};
  $('docs-title').textContent = `${info.title || 'API'} ${info.version || ''}`.trim();
  $('docs-description').textContent = info.description || '';
  const groups = new Map();
  const tagOrder = (doc.tags || []).map((t) => t.name);
  let count = 0;
  for (const [path, item] of Object.entries(doc.paths || {})) {
    for (const method of HTTP_METHODS) {
      const op = item[method];
      if (!op) continue;
      count += 1;
      for (const tag of op.tags && op.tags.length ? op.tags : ['default']) {
        if (!groups.has(tag)) groups.set(tag, []);
        groups.get(tag).push(renderOperation(doc, path, method, op));
      }
    }
  }
  const tagInfo = new Map((doc.tags || []).map((t) => [t.name, t]));
  const ordered = [...groups.keys()].sort((a, b) => {
    const ia = tagOrder.indexOf(a);
    const ib = tagOrder.indexOf(b);
    return (ia < 0 ? 1e9 : ia) - (ib < 0 ? 1e9 : ib) || a.localeCompare(b);
  });
  root.replaceChildren(
    el('p', { class: 'muted', id: 'docs-count' }, `${count} operations in ${ordered.length} group${ordered.length === 1 ? '' : 's'} (OpenAPI ${doc.openapi || '?'})`),
    ...ordered.map((tag) =>
      el('section', { class: 'tag-group', dataset: { tag } }, el('h2', {}, tag), tagInfo.get(tag)?.description ? el('p', { class: 'muted' }, tagInfo.get(tag).description) : null, groups.get(tag)),
    ),
  );
  const filter = $('docs-filter');
  filter.addEventListener('input', () => {
    const needle = filter.value.trim().toLowerCase();
    for (const op of root.querySelectorAll('.op')) {
      op.hidden = needle !== '' && !op.textContent.toLowerCase().includes(needle);
    }
    for (const group of root.querySelectorAll('.tag-group')) {
      group.hidden = ![...group.querySelectorAll('.op')].some((op) => !op.hidden);
    }
  });
  if (location.hash) document.getElementById(location.hash.slice(1))?.setAttribute('open', '');
}

// ---------------------------------------------------------------------------------------------

const page = document.body.dataset.page;
if (page === 'docs') startDocs();
else startUi();
