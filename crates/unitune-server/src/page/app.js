// The unitune page: upload and tune a photo, then edit it, watching each job's events.
'use strict';

const $ = (id) => document.getElementById(id);
const state = { info: null, file: null, session: null, tuneJob: null, editJob: null };

// ---- API ----------------------------------------------------------------------------------

async function api(path, options = {}) {
  const response = await fetch(path, { credentials: 'same-origin', ...options });
  if (response.status === 401) { showLogin(); throw new Error('log in first'); }
  const text = await response.text();
  const body = text ? JSON.parse(text) : null;
  if (!response.ok) throw new Error(body && body.error ? body.error : `${response.status} ${response.statusText}`);
  return body;
}

function showError(error) {
  $('error-text').textContent = error.message || String(error);
  $('error').hidden = false;
}
$('error-close').onclick = () => { $('error').hidden = true; };

function showLogin() { $('app').hidden = true; $('login').hidden = false; }

// Follows a job's server-sent events; `handlers[kind](data)` for each, then `end(kind)`.
function follow(job, handlers, end) {
  const source = new EventSource(`/api/jobs/${job}/events`);
  const kinds = ['queued', 'started', 'loaded', 'progress', 'preview', 'edit', 'image', 'sheet',
    'session', 'warning', 'done', 'error', 'cancelled'];
  for (const kind of kinds) {
    source.addEventListener(kind, (event) => {
      const data = JSON.parse(event.data);
      if (handlers[kind]) handlers[kind](data);
      if (kind === 'done' || kind === 'error' || kind === 'cancelled') { source.close(); end(kind, data); }
    });
  }
  return source;
}

// With --nats the front end does not know the place in the shared queue.
const queuedText = (d) => (d.position == null ? 'queued' : `queued, place ${d.position}`);

function seconds(s) {
  if (s == null) return '';
  return s < 60 ? `${Math.round(s)} s` : `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
}

// ---- Start --------------------------------------------------------------------------------

async function start() {
  try {
    state.info = await api('/api/info');
  } catch (e) { if (!$('login').hidden) return; showError(e); return; }
  $('app').hidden = false;
  const [w, h] = state.info.size;
  $('model-info').textContent = `model ${state.info.model || ''}, ${w}×${h} px`;
  const t = state.info.tune;
  $('tune-steps').value = t.steps; $('tune-lr').value = t.lr; $('tune-batch').value = t.batch;
  $('tune-layers').value = t.layers; $('tune-lora-rank').value = t.lora_rank ?? '';
  if (t.delta_encoding && t.delta_encoding !== 'lora') $('tune-encoding').value = t.delta_encoding;
  showLayerFields();
  fillEditForm(state.info.edit);
  await loadSessions();
}

// ---- Upload and tune ----------------------------------------------------------------------

const drop = $('drop');
drop.addEventListener('dragover', (e) => { e.preventDefault(); drop.classList.add('over'); });
drop.addEventListener('dragleave', () => drop.classList.remove('over'));
drop.addEventListener('drop', (e) => {
  e.preventDefault(); drop.classList.remove('over');
  if (e.dataTransfer.files.length) pickFile(e.dataTransfer.files[0]);
});
$('file-input').addEventListener('change', (e) => { if (e.target.files.length) pickFile(e.target.files[0]); });

// Shows the photo with the centre crop the tune will take (scale to cover, crop the middle).
function pickFile(file) {
  state.file = file;
  const image = new Image();
  image.onload = () => {
    const [w, h] = state.info.size;
    const scale = Math.max(w / image.width, h / image.height);
    const cw = w / scale, ch = h / scale;
    const cx = (image.width - cw) / 2, cy = (image.height - ch) / 2;
    const full = $('crop-full');
    full.width = image.width; full.height = image.height;
    const g = full.getContext('2d');
    g.drawImage(image, 0, 0);
    g.strokeStyle = '#4b5bdc'; g.lineWidth = Math.max(2, image.width / 100);
    g.strokeRect(cx, cy, cw, ch);
    const result = $('crop-result');
    result.width = w; result.height = h;
    result.getContext('2d').drawImage(image, cx, cy, cw, ch, 0, 0, w, h);
    $('crop-caption').textContent = `What the model tunes on: ${w}×${h} px`;
    $('crop').hidden = false;
    $('tune-button').disabled = false;
  };
  image.onerror = () => showError(new Error(`${file.name}: the browser cannot read this picture`));
  image.src = URL.createObjectURL(file);
}

// The rank means something for a LoRA tune only, and a LoRA tune's session holds its factors.
function showLayerFields() {
  const lora = $('tune-layers').value === 'lora';
  $('tune-lora-rank').disabled = !lora;
  $('tune-encoding').disabled = lora;
}
$('tune-layers').onchange = showLayerFields;

$('tune-button').onclick = async () => {
  if (!state.file) return;
  const settings = {
    steps: Number($('tune-steps').value), lr: Number($('tune-lr').value),
    batch: Number($('tune-batch').value), layers: $('tune-layers').value,
  };
  if (settings.layers === 'lora' && $('tune-lora-rank').value !== '') {
    settings.lora_rank = Number($('tune-lora-rank').value);
  }
  if (settings.layers !== 'lora') settings.delta_encoding = $('tune-encoding').value;
  if ($('tune-token').value.trim()) settings.token = $('tune-token').value.trim();
  if ($('tune-seed').value !== '') settings.seed = Number($('tune-seed').value);
  const form = new FormData();
  form.append('image', state.file, state.file.name);
  form.append('settings', JSON.stringify(settings));
  try {
    const answer = await api('/api/sessions', { method: 'POST', body: form });
    watchTune(answer.job.id);
  } catch (e) { showError(e); }
};

function watchTune(job) {
  state.tuneJob = job;
  const losses = [];
  let phase = null;
  $('tune-button').disabled = true;
  $('tune-progress').hidden = false;
  $('tune-bar').style.width = '0';
  $('tune-status').textContent = 'queued';
  follow(job, {
    queued: (d) => { $('tune-status').textContent = queuedText(d); },
    progress: (d) => {
      // The distillation's loss (against the tuned model) is on another scale: a curve of its own.
      if (d.phase !== phase) { phase = d.phase; losses.length = 0; }
      if (d.loss != null && d.step > 0) losses.push(d.loss);
      $('tune-bar').style.width = `${(100 * d.step) / Math.max(1, d.total)}%`;
      const loss = d.loss != null ? `, loss ${d.loss.toFixed(4)}` : '';
      $('tune-status').textContent = `${d.phase} ${d.step}/${d.total}${loss}, ETA ${seconds(d.eta_s)}`;
      drawLosses(losses);
    },
    session: async (meta) => { await loadSessions(); selectSession(meta.id); },
    error: (d) => showError(new Error(`tune failed: ${d.message}`)),
  }, (kind) => {
    state.tuneJob = null;
    $('tune-button').disabled = !state.file;
    $('tune-status').textContent = kind === 'done' ? 'tuned' : kind;
    if (kind === 'done') $('tune-progress').hidden = true;
  });
}

$('tune-cancel').onclick = () => cancel(state.tuneJob);

async function cancel(job) {
  if (!job) return;
  try { await api(`/api/jobs/${job}/cancel`, { method: 'POST' }); } catch (e) { showError(e); }
}

function drawLosses(losses) {
  const canvas = $('loss-curve'), g = canvas.getContext('2d');
  g.clearRect(0, 0, canvas.width, canvas.height);
  if (losses.length < 2) return;
  const max = Math.max(...losses), min = Math.min(...losses);
  g.strokeStyle = '#4b5bdc'; g.beginPath();
  losses.forEach((l, i) => {
    const x = (i / (losses.length - 1)) * (canvas.width - 8) + 4;
    const y = canvas.height - 4 - ((l - min) / Math.max(1e-9, max - min)) * (canvas.height - 8);
    if (i === 0) g.moveTo(x, y); else g.lineTo(x, y);
  });
  g.stroke();
}

// ---- Sessions -----------------------------------------------------------------------------

async function loadSessions() {
  const sessions = await api('/api/sessions');
  const list = $('session-list');
  list.replaceChildren();
  $('no-sessions').hidden = sessions.length > 0;
  for (const s of sessions) {
    const item = document.createElement('li');
    item.className = 'session';
    item.dataset.id = s.id;
    const img = document.createElement('img');
    img.src = s.image; img.alt = s.name;
    const text = document.createElement('div');
    const name = document.createElement('div');
    name.textContent = s.name;
    const meta = document.createElement('div');
    meta.className = 'meta';
    const layers = s.settings.layers === 'lora' ? `LoRA rank ${s.settings.lora_rank}` : `${s.settings.layers} layers, ${s.settings.delta_encoding}`;
    meta.textContent = `${s.token} · ${s.settings.steps} steps · lr ${s.settings.learning_rate} · ${layers} · ${s.width}×${s.height}`;
    text.append(name, meta);
    item.append(img, text);
    item.onclick = () => selectSession(s.id);
    if (state.session && state.session.id === s.id) item.classList.add('selected');
    list.append(item);
  }
  return sessions;
}

$('new-session').onclick = () => {
  state.session = null;
  $('edit-panel').hidden = true; $('tune-panel').hidden = false;
  for (const li of $('session-list').children) li.classList.remove('selected');
};

async function selectSession(id) {
  try {
    state.session = await api(`/api/sessions/${id}`);
  } catch (e) { showError(e); return; }
  for (const li of $('session-list').children) li.classList.toggle('selected', li.dataset.id === id);
  $('tune-panel').hidden = true; $('edit-panel').hidden = false;
  $('session-title').textContent = `${state.session.name} (token ${state.session.token})`;
  const img = $('session-image');
  img.onload = () => resetMask();
  img.src = state.session.image;
  $('preview').hidden = true;
  await loadGallery();
}

// ---- Mask painting ------------------------------------------------------------------------

const mask = $('mask-canvas');
let painting = false, painted = false;

function resetMask() {
  mask.width = state.session.width; mask.height = state.session.height;
  const g = mask.getContext('2d');
  g.fillStyle = '#000'; g.fillRect(0, 0, mask.width, mask.height);
  painted = false;
  mask.style.opacity = $('paint-mask').checked ? '.45' : '0';
}
$('clear-mask').onclick = resetMask;
$('paint-mask').onchange = () => {
  mask.classList.toggle('active', $('paint-mask').checked);
  mask.style.opacity = $('paint-mask').checked ? '.45' : '0';
  if ($('paint-mask').checked) $('auto-mask').checked = false;
};
$('auto-mask').onchange = () => { if ($('auto-mask').checked) { $('paint-mask').checked = false; $('paint-mask').onchange(); } };

function paintAt(event) {
  const rect = mask.getBoundingClientRect();
  const x = ((event.clientX - rect.left) / rect.width) * mask.width;
  const y = ((event.clientY - rect.top) / rect.height) * mask.height;
  const r = (Number($('brush').value) / rect.width) * mask.width;
  const g = mask.getContext('2d');
  g.fillStyle = '#fff'; g.beginPath(); g.arc(x, y, r, 0, 2 * Math.PI); g.fill();
  painted = true;
}
mask.addEventListener('pointerdown', (e) => { if (!$('paint-mask').checked) return; painting = true; paintAt(e); });
mask.addEventListener('pointermove', (e) => { if (painting) paintAt(e); });
window.addEventListener('pointerup', () => { painting = false; });

// ---- Edit ---------------------------------------------------------------------------------

const list = (text) => text.split(',').map((s) => s.trim()).filter((s) => s).map(Number);

function editParams() {
  const p = {
    prompt: $('prompt').value, negative_prompt: $('negative-prompt').value,
    guidance: Number($('guidance').value), start: Number($('start').value),
    prompt_guidance: Number($('prompt-guidance').value), interpolate: Number($('interpolate').value),
    steps: Number($('steps').value),
    sweep_guidance: list($('sweep-guidance').value), sweep_start: list($('sweep-start').value),
  };
  if ($('baseline-prompt').value.trim()) p.baseline_prompt = $('baseline-prompt').value;
  if ($('seed').value !== '') p.seed = Number($('seed').value);
  if ($('auto-mask').checked) p.auto_mask = true;
  else if ($('paint-mask').checked && painted) p.mask = mask.toDataURL('image/png');
  return p;
}

function fillEditForm(p) {
  $('prompt').value = p.prompt || ''; $('negative-prompt').value = p.negative_prompt || '';
  $('guidance').value = p.guidance; $('start').value = p.start;
  $('baseline-prompt').value = p.baseline_prompt || ''; $('prompt-guidance').value = p.prompt_guidance;
  $('interpolate').value = p.interpolate; $('steps').value = p.steps;
  $('seed').value = p.seed != null && p.seed >= 0 ? p.seed : '';
  $('sweep-guidance').value = (p.sweep_guidance || []).join(',');
  $('sweep-start').value = (p.sweep_start || []).join(',');
  $('auto-mask').checked = !!p.auto_mask;
}

$('edit-form').onsubmit = async (event) => {
  event.preventDefault();
  if (!state.session) return;
  try {
    const answer = await api(`/api/sessions/${state.session.id}/edits`, {
      method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(editParams()),
    });
    watchEdit(answer.job.id);
  } catch (e) { showError(e); }
};

function watchEdit(job) {
  state.editJob = job;
  const session = state.session.id;
  $('edit-button').disabled = true; $('edit-cancel').hidden = false;
  $('edit-progress').hidden = false; $('edit-bar').style.width = '0';
  $('edit-status').textContent = 'queued';
  let edit = '';
  follow(job, {
    queued: (d) => { $('edit-status').textContent = queuedText(d); },
    edit: (d) => { edit = `edit ${d.index}/${d.total}`; },
    progress: (d) => {
      $('edit-bar').style.width = `${(100 * d.step) / Math.max(1, d.total)}%`;
      $('edit-status').textContent = `${edit} ${d.phase} ${d.step}/${d.total}, ETA ${seconds(d.eta_s)}`;
    },
    preview: (d) => {
      $('preview').hidden = false;
      $('preview-image').src = d.image;
      $('preview-caption').textContent = `${d.phase}: predicted picture after step ${d.step + 1}`;
    },
    image: (d) => {
      $('preview').hidden = false;
      $('preview-image').src = d.url;
      $('preview-caption').textContent = `result ${d.index + 1}`;
      if (state.session && state.session.id === session) loadGallery();
    },
    warning: (d) => { $('edit-status').textContent = d.message; },
    error: (d) => showError(new Error(`edit failed: ${d.message}`)),
  }, (kind) => {
    state.editJob = null;
    $('edit-button').disabled = false; $('edit-cancel').hidden = true; $('edit-progress').hidden = true;
    $('edit-status').textContent = kind === 'done' ? 'done' : kind;
    if (state.session && state.session.id === session) loadGallery();
  });
}
$('edit-cancel').onclick = () => cancel(state.editJob);

// ---- Gallery ------------------------------------------------------------------------------

async function loadGallery() {
  const edits = await api(`/api/sessions/${state.session.id}/edits`);
  const gallery = $('gallery');
  gallery.replaceChildren();
  for (const edit of edits) {
    const card = document.createElement('div');
    card.className = 'card';
    const p = edit.params;
    const columns = Math.max(1, p.sweep_guidance.length);
    const images = document.createElement('div');
    images.className = 'images';
    images.style.gridTemplateColumns = `repeat(${Math.min(columns, 6)}, 140px)`;
    edit.images.forEach((image, i) => {
      const img = document.createElement('img');
      img.className = 'result';
      img.src = edit.urls[i];
      img.alt = image.prompt;
      img.title = `seed ${image.seed}, guidance ${image.guidance}, start ${image.start}`;
      img.onclick = () => view(edit.urls[i], `"${image.prompt}" seed ${image.seed}, guidance ${image.guidance}, start ${image.start}`);
      images.append(img);
    });
    const settings = document.createElement('div');
    settings.className = 'settings';
    const mask = p.auto_mask ? ', auto-mask' : '';
    settings.textContent = `${edit.status}: "${[p.prompt, ...p.prompts].filter((x) => x).join('", "')}"` +
      ` guidance ${p.sweep_guidance.length ? p.sweep_guidance.join('/') : p.guidance}` +
      `, start ${p.sweep_start.length ? p.sweep_start.join('/') : p.start}, seed ${p.seed}, ${p.steps} steps${mask}` +
      (edit.error ? ` (${edit.error})` : '');
    const actions = document.createElement('div');
    actions.className = 'row';
    const reuse = document.createElement('button');
    reuse.className = 'secondary'; reuse.type = 'button'; reuse.textContent = 'Use these settings';
    reuse.onclick = () => fillEditForm(p);
    actions.append(reuse);
    for (const url of edit.sheet_urls) {
      const a = document.createElement('a');
      a.href = url; a.download = `sheet-${edit.id}.png`; a.textContent = 'Download contact sheet';
      actions.append(a);
    }
    card.append(images, settings, actions);
    gallery.append(card);
  }
}

function view(url, caption) {
  $('viewer-image').src = url;
  $('viewer-caption').textContent = caption;
  $('viewer-download').href = url;
  $('viewer').showModal();
}
$('viewer-close').onclick = () => $('viewer').close();

start();
