// printloop dashboard: an ES module (strict, own scope, deferred). Vanilla JS, no dependencies.
// Every server string reaches the DOM through textContent / text nodes / setAttribute, never innerHTML.
const API = '/api/v1';
const CHUNK = 1024 * 1024;
const $ = (id) => document.getElementById(id);
const enc = encodeURIComponent;

const S = {
  me: null, started: false,
  tiles: new Map(),     // printer_id -> {t, view}
  order: [],            // printer ids in grid order
  counts: {}, queue: { counts: {}, jobs: [] }, hist: [], util: [],
  qrows: new Map(), hrows: new Map(), prows: new Map(), urows: new Map(),
  inflight: new Set(), results: new Map(),
  filter: { status: '', tag: '', text: '' }, tagKey: '',
  es: null, esRetry: 0, esTimer: 0, lastAt: 0, live: false,
  view: '', detailId: null, detailView: null, detailTimer: 0, file: null, uploading: false,
};

// ---------- small helpers ----------
function h(tag, props, ...kids) {
  const el = document.createElement(tag);
  if (props) for (const k of Object.keys(props)) {
    const v = props[k];
    if (v == null || v === false) continue;
    if (k === 'class') el.className = v;
    else if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of kids.flat()) if (c != null && c !== false) el.append(c instanceof Node ? c : String(c));
  return el;
}
const setText = (el, s) => { s = s == null ? '' : String(s); if (el.textContent !== s) el.textContent = s; };
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const pad = (n) => String(n).padStart(2, '0');
function uuid() {
  if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
}
function fmtDur(s) {
  if (s == null || !isFinite(s)) return '—';
  s = Math.max(0, Math.round(s));
  if (s < 60) return s + ' s';
  const hh = Math.floor(s / 3600), mm = Math.floor((s % 3600) / 60);
  return hh ? `${hh} h ${pad(mm)} min` : `${mm} min`;
}
const fmtClock = (ms) => { const d = new Date(ms); return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`; };
function fmtWhen(ms) {
  if (!ms) return '—';
  const d = new Date(ms), now = new Date();
  const hm = `${pad(d.getHours())}:${pad(d.getMinutes())}`;
  if (d.toDateString() === now.toDateString()) return hm;
  return d.toLocaleDateString(undefined, { month: 'short', day: 'numeric' }) + ' ' + hm;
}
const fmtTemp = (x) => x ? `${Math.round(x.actual)} / ${Math.round(x.target)} °C` : '— °C';
const fmtMiB = (n) => (n / CHUNK).toFixed(1);
const pct = (x) => Math.max(0, Math.min(100, Number(x) || 0));
const printerHref = (id) => '#/printer/' + enc(id);

// ---------- API ----------
class ApiError extends Error {
  constructor(status, code, msg, body) { super(msg); this.status = status; this.code = code; this.body = body || {}; }
}
async function api(method, path, opt = {}) {
  const headers = Object.assign({ 'X-Printloop': '1' }, opt.headers);
  let body = opt.body;
  if (opt.json !== undefined) { headers['Content-Type'] = 'application/json'; body = JSON.stringify(opt.json); }
  if (opt.idem) headers['Idempotency-Key'] = opt.idem;
  let res, text;
  try {
    res = await fetch(API + path, { method, headers, body, credentials: 'same-origin', cache: 'no-store' });
    text = res.status === 204 ? '' : await res.text();
  } catch (e) {
    throw new ApiError(0, 'network', 'could not reach the server');
  }
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = null; }
  if (!res.ok) {
    const d = data && typeof data === 'object' ? data : {};
    const err = new ApiError(res.status, d.code || 'http_' + res.status, d.error || res.statusText || 'HTTP ' + res.status, d);
    if (res.status === 401 && !opt.auth) signedOut('Your session has ended. Sign in again.');
    throw err;
  }
  return data;
}
const errText = (e) => `${e.message} (${e.code})`;

function toast(ok, text) {
  const box = $('toasts');
  const el = h('div', { class: 'toast ' + (ok ? 'ok' : 'err'), role: ok ? 'status' : 'alert' }, text);
  el.addEventListener('click', () => el.remove());
  box.append(el);
  while (box.children.length > 5) box.firstChild.remove();
  setTimeout(() => el.remove(), ok ? 4000 : 9000);
}

// Runs one action: disables the button while in flight, shows the answer.
async function run(btn, key, label, method, path, json, onResult) {
  if (S.inflight.has(key)) return;
  S.inflight.add(key);
  if (btn) { btn.disabled = true; btn.classList.add('busy'); }
  let ok = false, text, data = null;
  try {
    data = await api(method, path, { json, idem: uuid() });
    ok = true; text = `${label}: ok` + (data && data.job_ids ? ` → ${data.job_ids.join(', ')}` : '');
  } catch (e) {
    text = e.code === 'network' ? `${label}: failed: ${errText(e)}` : `${label}: refused: ${errText(e)}`;
  }
  S.inflight.delete(key);
  if (btn && btn.isConnected) { btn.disabled = false; btn.classList.remove('busy'); }
  toast(ok, text);
  if (onResult) onResult(ok, text, data);
  return ok;
}

// ---------- session ----------
function show(id) {
  for (const v of document.querySelectorAll('.view')) v.hidden = v.id !== id;
}
function signedOut(msg) {
  if (S.es) { S.es.close(); S.es = null; }
  clearTimeout(S.esTimer);
  const had = S.me;
  S.me = null;
  for (const id of ['nav', 'conn', 'who', 'signout', 'wall-toggle']) $(id).hidden = true;
  show('signin-view');
  setText($('signin-error'), msg || '');
  if (had) S.reloadAfterSignin = true;
  $('token').focus();
}
function signedIn(me) {
  if (S.reloadAfterSignin) { location.reload(); return; }
  S.me = me;
  const op = me.role === 'operator';
  const who = $('who');
  who.replaceChildren(h('b', null, me.name || '?'), h('span', { class: 'role ' + (op ? 'operator' : 'viewer') }, me.role || '?'));
  who.title = `Signed in as ${me.name} (${me.role})`;
  for (const id of ['nav', 'conn', 'who', 'signout', 'wall-toggle']) $(id).hidden = false;
  $('readonly-note').hidden = op;
  $('submit-form').hidden = !op;
  $('viewer-submit').hidden = op;
  if (!S.started) {
    S.started = true;
    setConn(false);
    // first paint; ignored if the stream's own `fleet` came first (that one is newer)
    api('GET', '/fleet').then((f) => { if (!S.streamFleet) applyFleet(f); }).catch(() => {});
    connectStream();
  }
  route();
}
async function signIn(token) {
  const me = await api('POST', '/session', { json: { token }, auth: true });
  signedIn(me);
}
// #token=... (the demo's link): sign in with it, and drop it from the address bar and history.
function hashToken() {
  const m = /^#token=([^&]*)/.exec(location.hash);
  if (!m) return false;
  let tok = m[1];
  try { tok = decodeURIComponent(tok); } catch (e) { /* keep raw */ }
  window.history.replaceState(null, '', location.pathname + location.search);
  signIn(tok).catch((e) => {
    signedOut(e.status === 401 ? 'The token in the link was not accepted.' : 'Sign-in failed: ' + errText(e));
  });
  return true;
}
async function boot() {
  initWall();
  initGrid();
  initQueue();
  initHistory();
  $('signin').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const btn = $('signin-btn'), tok = $('token').value.trim();
    if (!tok) return;
    btn.disabled = true; setText($('signin-error'), '');
    try { await signIn(tok); $('token').value = ''; } catch (e) {
      setText($('signin-error'), e.status === 401 ? 'That token was not accepted.' : 'Sign-in failed: ' + errText(e));
    }
    btn.disabled = false;
  });
  $('signout').addEventListener('click', async () => {
    try { await api('DELETE', '/session', { auth: true }); } catch (e) { /* signed out anyway */ }
    location.replace(location.pathname + location.search);
  });
  window.addEventListener('hashchange', () => { if (!hashToken()) route(); });
  if (hashToken()) return;
  for (let i = 0; ; i++) {
    try { signedIn(await api('GET', '/session', { auth: true })); return; } catch (e) {
      if (e.status === 401) { signedOut(''); return; }
      signedOut(`Cannot reach the supervisor (${e.code}); retrying…`);
      await sleep(Math.min(10000, 1000 * 2 ** i));
    }
  }
}

// ---------- routing ----------
function route() {
  if (!S.me) return;
  const hs = location.hash;
  let view = 'grid', id = null, m;
  if ((m = /^#\/printer\/(.+)$/.exec(hs))) {
    view = 'printer';
    try { id = decodeURIComponent(m[1]); } catch (e) { id = m[1]; }
  } else if (hs === '#/queue') view = 'queue';
  else if (hs === '#/history') view = 'history';
  S.view = view;
  show(view + '-view');
  for (const a of $('nav').querySelectorAll('a')) {
    if (a.dataset.view === view) a.setAttribute('aria-current', 'page'); else a.removeAttribute('aria-current');
  }
  document.title = { grid: 'Fleet', queue: 'Queue', history: 'History', printer: id }[view] + ' · printloop';
  if (view === 'printer') openPrinter(id); else closePrinter();
  if (view === 'history') loadHistory();
  if (view === 'queue') renderQueue();
}

// ---------- wall mode ----------
function initWall() {
  const q = new URLSearchParams(location.search);
  let on = false;
  try { on = q.has('wall') ? q.get('wall') !== '0' : localStorage.getItem('printloop.wall') === '1'; } catch (e) { /* no storage */ }
  const dark = matchMedia('(prefers-color-scheme: dark)');
  const apply = () => {
    document.body.classList.toggle('wall', on);
    document.documentElement.classList.toggle('dark', on || dark.matches);
    $('wall-toggle').setAttribute('aria-pressed', String(on));
    setText($('wall-toggle'), on ? 'Exit wall' : 'Wall');
  };
  apply();
  dark.addEventListener('change', apply);
  $('wall-toggle').addEventListener('click', () => {
    on = !on;
    try { localStorage.setItem('printloop.wall', on ? '1' : '0'); } catch (e) { /* private mode */ }
    apply();
  });
  if (q.get('status')) S.filter.status = q.get('status');
  if (q.get('tag')) S.filter.tag = q.get('tag');
}

// ---------- tiles ----------
function tileClass(t) {
  if (t.presence === 'offline' || t.phase === 'disconnected') return 'offline';
  if (t.phase === 'error' || t.phase === 'halted') return 'error';
  if (t.phase === 'paused') return 'paused';
  if (t.awaiting_bed_clear || t.phase === 'finished') return 'done';
  if (t.phase === 'printing') return 'printing';
  if (t.phase === 'preparing') return 'preparing';
  return 'idle';
}
const phaseText = (t) => (t.presence === 'offline' ? 'offline' : t.phase || '?');
const isOffline = (t) => t.presence === 'offline' || t.phase === 'disconnected';

// Status filters; keys match FleetView.counts where the server has a count.
const STATUS = [
  ['printing', 'printing', 'printing', (t) => !isOffline(t) && (t.phase === 'printing' || t.phase === 'preparing')],
  ['paused', 'paused', 'paused', (t) => t.phase === 'paused'],
  ['awaiting_bed_clear', 'bed clear', 'done', (t) => !!t.awaiting_bed_clear || t.phase === 'finished'],
  ['error', 'error', 'error', (t) => t.phase === 'error'],
  ['halted', 'halted', 'error', (t) => t.phase === 'halted'],
  ['held', 'held', 'error', (t) => !!t.held],
  ['offline', 'offline', 'offline', isOffline],
  ['stale', 'stale', 'offline', (t) => !!t.stale],
  ['idle', 'idle', 'idle', (t) => !isOffline(t) && (t.phase === 'idle' || t.phase === 'ready')],
];
const STATUS_FN = Object.fromEntries(STATUS.map((s) => [s[0], s[3]]));
STATUS_FN.maintenance = (t) => !!t.maintenance;
STATUS_FN.attention = (t) => t.phase === 'error' || t.phase === 'halted' || t.phase === 'paused' || t.phase === 'finished' || !!t.held || !!t.awaiting_bed_clear || isOffline(t);

function badges(t) {
  const b = [];
  if (t.presence === 'offline') b.push(['offline', 'offline']);
  if (t.stale) b.push(['stale', 'stale']);
  if (t.phase === 'halted') b.push(['halted', 'halted']);
  if (t.held) b.push(['held', 'held (breaker)']);
  if (t.awaiting_bed_clear) b.push(['bed', 'awaiting bed clear']);
  if (t.maintenance) b.push(['maint', 'maintenance']);
  if (t.enrolled === false) b.push(['unenrolled', 'not enrolled']);
  if (t.consecutive_failures > 0) b.push(['failures', `${t.consecutive_failures} failed in a row`]);
  return b;
}

const pp = (a) => (t) => `/printers/${enc(t.printer_id)}/${a}`;
const ACTIONS = {
  'bed-clear': { label: 'Bed cleared', cls: 'primary', path: pp('bed-clear'), json: { failed: false } },
  'bed-clear-failed': { label: 'Cleared, print failed', path: pp('bed-clear'), json: { failed: true } },
  pause: { label: 'Pause', path: pp('pause') },
  resume: { label: 'Resume', cls: 'primary', path: pp('resume') },
  cancel: {
    label: 'Cancel', cls: 'danger', path: (t) => `/jobs/${enc(t.job.job_id)}/cancel`,
    confirm: (t) => `Cancel "${t.job.name}" on ${t.printer_id}?`,
  },
  release: { label: 'Release', cls: 'primary', path: pp('release') },
};
function tileActions(t) {
  if (!S.me || S.me.role !== 'operator') return [];
  const a = [], ph = t.phase;
  if (t.awaiting_bed_clear || ph === 'finished' || ph === 'error') a.push('bed-clear', 'bed-clear-failed');
  if (ph === 'printing') a.push('pause');
  if (ph === 'paused') a.push('resume');
  if (t.job && (ph === 'printing' || ph === 'paused' || ph === 'preparing')) a.push('cancel');
  if (t.held) a.push('release');
  return a;
}

function makeTile(id, detail) {
  const r = {};
  const el = h('article', detail ? { class: 'tile', 'data-detail': id } : { class: 'tile', 'data-printer': id });
  r.name = h('a', { class: 't-name', href: printerHref(id) }, id);
  r.phase = h('span', { class: 't-phase' });
  r.badges = h('div', { class: 't-badges' });
  r.job = h('div', { class: 't-job' });
  r.fill = h('div', { class: 'bar-fill' });
  r.bar = h('div', { class: 'bar', role: 'progressbar', 'aria-valuemin': 0, 'aria-valuemax': 100, 'aria-label': 'progress' }, r.fill);
  r.pct = h('span'); r.left = h('span');
  r.noz = h('span'); r.bed = h('span');
  r.err = h('div', { class: 't-err' });
  r.acts = h('div', { class: 't-actions' });
  r.res = h('p', { class: 't-result', role: 'status' });
  el.append(h('div', { class: 't-head' }, r.name, r.phase), r.badges, r.job, r.bar,
    h('div', { class: 't-meta' }, r.pct, r.left), h('div', { class: 't-temps' }, r.noz, r.bed), r.err, r.acts, r.res);
  return { id, el, r, v: null, bkey: null, akey: null, rkey: null };
}

function paintTile(view, t, force) {
  const r = view.r;
  if (force || t.version == null || view.v !== t.version) {
    view.v = t.version;
    view.el.className = 'tile ph-' + tileClass(t) + (t.stale ? ' stale' : '');
    setText(r.phase, phaseText(t));
    const b = badges(t), bkey = b.map((x) => x[1]).join('|');
    if (bkey !== view.bkey) {
      view.bkey = bkey;
      r.badges.replaceChildren(...b.map(([c, txt]) => h('span', { class: 'badge b-' + c }, txt)));
    }
    const j = t.job;
    if (j) {
      setText(r.job, j.name); r.job.title = j.name; r.job.classList.remove('none');
      const p = pct(j.progress_pct);
      r.fill.style.width = p + '%';
      r.bar.setAttribute('aria-valuenow', Math.floor(p));
      r.bar.hidden = false;
      r.pct.replaceChildren(h('b', null, Math.floor(p) + '%'), j.stage && j.stage !== t.phase ? ' · ' + j.stage : '');
      setText(r.left, j.remaining_s != null ? fmtDur(j.remaining_s) + ' left' : '');
    } else {
      setText(r.job, 'no job'); r.job.removeAttribute('title'); r.job.classList.add('none');
      r.bar.hidden = true; r.pct.replaceChildren(); setText(r.left, '');
    }
    setText(r.noz, 'Nozzle ' + fmtTemp(t.temps && t.temps.nozzle));
    setText(r.bed, 'Bed ' + fmtTemp(t.temps && t.temps.bed));
    setText(r.err, t.error || '');
    r.err.title = t.error || '';
  }
  const acts = tileActions(t);
  const akey = acts.map((a) => a + (S.inflight.has(t.printer_id + ':' + a) ? '*' : '')).join(',');
  if (akey !== view.akey) {
    view.akey = akey;
    r.acts.replaceChildren(...acts.map((a) => h('button', {
      type: 'button', class: ACTIONS[a].cls || '', 'data-action': a, disabled: S.inflight.has(t.printer_id + ':' + a),
    }, ACTIONS[a].label)));
  }
  const res = S.results.get(t.printer_id);
  const rkey = res ? res.at : 0;
  if (rkey !== view.rkey) {
    view.rkey = rkey;
    setText(r.res, res ? res.text : '');
    r.res.className = 't-result' + (res ? (res.ok ? ' ok' : ' err') : '');
  }
}

function tileAction(ev) {
  const btn = ev.target.closest('button[data-action]');
  if (!btn) return;
  const host = btn.closest('[data-printer],[data-detail]');
  if (!host) return;
  const id = host.getAttribute('data-printer') || host.getAttribute('data-detail');
  const t = tileData(id), name = btn.dataset.action, def = ACTIONS[name];
  if (!t || !def) return;
  if (name === 'cancel' && !t.job) return;
  if (def.confirm && !window.confirm(def.confirm(t))) return;
  const key = id + ':' + name;
  const p = run(btn, key, `${id} · ${def.label}`, 'POST', def.path(t), def.json, (ok, text) => {
    S.results.set(id, { ok, text, at: Date.now() });
    repaint(id);
    setTimeout(() => { const r = S.results.get(id); if (r && Date.now() - r.at >= 14000) { S.results.delete(id); repaint(id); } }, 15000);
  });
  repaint(id);
  return p;
}
function tileData(id) {
  const e = S.tiles.get(id);
  return e ? e.t : id === S.detailId ? S.detailT : null;
}
function repaint(id) {
  const e = S.tiles.get(id);
  if (e) paintTile(e.view, e.t, false);
  if (S.detailView && S.detailId === id && S.detailT) paintTile(S.detailView, S.detailT, false);
}

// ---------- grid ----------
function initGrid() {
  $('grid').addEventListener('click', tileAction);
  $('p-tile').addEventListener('click', tileAction);
  const sel = $('f-status');
  sel.append(h('option', { value: '' }, 'all printers'), h('option', { value: 'attention' }, 'needs attention'),
    ...STATUS.map((s) => h('option', { value: s[0] }, s[1])), h('option', { value: 'maintenance' }, 'maintenance'));
  sel.value = S.filter.status;
  sel.addEventListener('change', () => setFilter('status', sel.value));
  $('f-tag').addEventListener('change', (ev) => setFilter('tag', ev.target.value));
  $('f-text').addEventListener('input', (ev) => setFilter('text', ev.target.value.trim().toLowerCase()));
  const counts = $('counts');
  counts.append(chip('', 'all', 'idle'), ...STATUS.map((s) => chip(s[0], s[1], s[2])));
  counts.addEventListener('click', (ev) => {
    const b = ev.target.closest('button[data-status]');
    if (b) setFilter('status', S.filter.status === b.dataset.status ? '' : b.dataset.status);
  });
}
function chip(key, label, cls) {
  return h('button', { type: 'button', class: 'chip ph-' + cls, 'data-status': key, 'aria-pressed': 'false' }, h('i'), h('b', null, '0'), label);
}
function setFilter(k, v) {
  S.filter[k] = v;
  if (k === 'status') $('f-status').value = v;
  applyFilter();
}
function matches(t) {
  const f = S.filter;
  if (f.status && STATUS_FN[f.status] && !STATUS_FN[f.status](t)) return false;
  if (f.tag && !(t.tags || []).includes(f.tag)) return false;
  if (f.text && !String(t.printer_id).toLowerCase().includes(f.text) && !(t.job && String(t.job.name).toLowerCase().includes(f.text))) return false;
  return true;
}
function applyFilter() {
  for (const e of S.tiles.values()) { const hid = !matches(e.t); if (e.view.el.hidden !== hid) e.view.el.hidden = hid; }
  renderSummary();
}
function renderSummary() {
  let shown = 0;
  const local = {};
  for (const e of S.tiles.values()) {
    if (!e.view.el.hidden) shown++;
    for (const s of STATUS) if (s[3](e.t)) local[s[0]] = (local[s[0]] || 0) + 1;
  }
  const total = S.tiles.size;
  for (const b of $('counts').children) {
    const k = b.dataset.status;
    const n = k === '' ? total : (S.counts && S.counts[k] != null ? S.counts[k] : local[k] || 0);
    setText(b.children[1], n);
    b.classList.toggle('zero', !n && k !== '');
    b.setAttribute('aria-pressed', String(S.filter.status === k && k !== ''));
  }
  setText($('shown'), shown === total ? `${total} printers` : `${shown} of ${total} shown`);
  $('grid-empty').hidden = shown > 0 || total === 0;
  // tag options
  const tags = new Set();
  for (const e of S.tiles.values()) for (const g of e.t.tags || []) tags.add(g);
  if (S.filter.tag) tags.add(S.filter.tag);
  const list = [...tags].sort(), key = list.join('\u0000');
  if (key !== S.tagKey) {
    S.tagKey = key;
    const sel = $('f-tag');
    sel.replaceChildren(h('option', { value: '' }, 'all tags'), ...list.map((g) => h('option', { value: g }, g)));
    sel.value = S.filter.tag;
  }
}

function upsertTile(t, place) {
  const id = t.printer_id;
  let e = S.tiles.get(id);
  if (!e) {
    e = { t, view: makeTile(id, false) };
    S.tiles.set(id, e);
    if (place) {
      // binary search for the sorted position
      let lo = 0, hi = S.order.length;
      while (lo < hi) { const mid = (lo + hi) >> 1; if (S.order[mid] < id) lo = mid + 1; else hi = mid; }
      const next = S.order[lo];
      S.order.splice(lo, 0, id);
      $('grid').insertBefore(e.view.el, next != null ? S.tiles.get(next).view.el : null);
    }
  }
  e.t = t;
  paintTile(e.view, t, false);
  const hid = !matches(t);
  if (e.view.el.hidden !== hid) e.view.el.hidden = hid;
  if (S.detailView && S.detailId === id) { S.detailT = t; paintTile(S.detailView, t, false); scheduleDetail(); }
}
function removeTile(id) {
  const e = S.tiles.get(id);
  if (!e) return;
  e.view.el.remove();
  S.tiles.delete(id);
  const i = S.order.indexOf(id);
  if (i >= 0) S.order.splice(i, 1);
}

function applyFleet(f) {
  if (!f || !Array.isArray(f.printers)) return;
  const ids = f.printers.map((t) => t.printer_id), seen = new Set(ids);
  for (const id of [...S.tiles.keys()]) if (!seen.has(id)) removeTile(id);
  for (const t of f.printers) upsertTile(t, false);
  const grid = $('grid');
  const same = ids.length === grid.children.length && ids.every((id, i) => grid.children[i] === S.tiles.get(id).view.el);
  if (!same) {
    const frag = document.createDocumentFragment();
    for (const id of ids) frag.append(S.tiles.get(id).view.el);
    grid.append(frag);
  }
  S.order = ids;
  S.counts = f.counts || null;
  renderSummary();
  if (f.queue) applyQueue(f.queue);
  touch(f.at_ms);
}
function applyTiles(d) {
  for (const t of d.printers || []) upsertTile(t, true);
  for (const id of d.removed || []) removeTile(id);
  if (d.counts) S.counts = d.counts;
  renderSummary();
  touch(d.at_ms);
}

// ---------- live stream ----------
function setConn(live) {
  S.live = live;
  const el = $('conn');
  el.dataset.state = live ? 'live' : 'down';
  const at = S.lastAt ? fmtClock(S.lastAt) : '';
  setText(el, live ? `live${at ? ' · ' + at : ''}` : at ? `reconnecting… · last ${at}` : 'connecting…');
  el.title = S.lastAt ? 'Last update ' + new Date(S.lastAt).toLocaleString() : 'No update yet';
}
function touch() { S.lastAt = Date.now(); setConn(S.live); }
// EventSource gave up (CLOSED): check the session, then open a new one, with back-off.
function reconnectLater() {
  clearTimeout(S.esTimer);
  const delay = Math.min(30000, 1000 * 2 ** S.esRetry++);
  S.esTimer = setTimeout(async () => {
    if (!S.me) return;
    try { await api('GET', '/session'); } catch (e) { if (e.status !== 401) reconnectLater(); return; }
    connectStream();
  }, delay);
}
function connectStream() {
  clearTimeout(S.esTimer);
  if (S.es) S.es.close();
  const es = new EventSource(API + '/stream');
  S.es = es;
  es.onopen = () => { if (S.es === es) { S.esRetry = 0; setConn(true); } };
  es.onerror = () => {
    if (S.es !== es) return;
    setConn(false);
    if (es.readyState === EventSource.CLOSED) { es.close(); S.es = null; reconnectLater(); }
  };
  const on = (name, fn) => es.addEventListener(name, (ev) => {
    if (S.es !== es) return;
    let d;
    try { d = JSON.parse(ev.data); } catch (e) { return; }
    if (!S.live) setConn(true);
    fn(d);
  });
  on('fleet', (f) => { S.streamFleet = true; applyFleet(f); });
  on('tiles', applyTiles);
  on('queue', (d) => { applyQueue(d); touch(); });
  on('history', (d) => { applyHistory(d); touch(); });
}

// ---------- tables (keyed rows) ----------
function td(label, cls, ...kids) { return h('td', { 'data-label': label, class: cls }, ...kids); }
function syncRows(tbody, map, items, key, make, paint) {
  const seen = new Set();
  let prev = null;
  for (const it of items) {
    const k = key(it);
    if (seen.has(k)) continue;
    seen.add(k);
    let row = map.get(k);
    if (!row) { row = make(it); map.set(k, row); }
    paint(row, it);
    const want = prev ? prev.nextSibling : tbody.firstChild;
    if (want !== row.el) tbody.insertBefore(row.el, want);
    prev = row.el;
  }
  for (const [k, row] of map) if (!seen.has(k)) { row.el.remove(); map.delete(k); }
}
const isOp = () => S.me && S.me.role === 'operator';
function stateCell(row, state) {
  row.state.className = 'pill s-' + String(state).replace(/[^a-z_]/g, '');
  setText(row.state, String(state).replace(/_/g, ' '));
}
function printerCell(row, pid) {
  pid = pid || '';
  if (pid === row.pid) return;
  row.pid = pid;
  row.printer.replaceChildren(pid ? h('a', { href: printerHref(pid) }, pid) : h('span', { class: 'muted' }, '—'));
}
function tagsCell(el, tags) {
  const k = (tags || []).join('\u0000');
  if (el.dataset.k === k) return;
  el.dataset.k = k;
  el.replaceChildren(h('div', { class: 'tags' }, (tags || []).map((g) => h('span', { class: 'tag' }, g))));
}

// ---------- queue ----------
const Q_COUNTS = [['queued', 'queued', 'idle'], ['starting', 'starting', 'preparing'], ['printing', 'printing', 'printing'],
  ['awaiting_harvest', 'awaiting harvest', 'done'], ['attention', 'attention', 'error']];
function initQueue() {
  $('qcounts').append(...Q_COUNTS.map(([k, l, c]) => h('span', { class: 'chip ph-' + c, 'data-count': k }, h('i'), h('b', null, '0'), l)));
  $('queue-body').addEventListener('click', queueClick);
  $('queue-body').addEventListener('change', (ev) => {
    const inp = ev.target.closest('input[data-action=priority]');
    if (inp) setPriority(inp.closest('tr').dataset.job, parseInt(inp.value, 10), inp);
  });
  initUpload();
}
function applyQueue(q) {
  if (!q) return;
  S.queue = { counts: q.counts || {}, jobs: Array.isArray(q.jobs) ? q.jobs : [] };
  renderQueue();
}
function renderQueue() {
  for (const c of $('qcounts').children) {
    const n = S.queue.counts[c.dataset.count] || 0;
    setText(c.children[1], n); c.classList.toggle('zero', !n);
  }
  if (S.view !== 'queue') return; // painted when the view opens
  syncRows($('queue-body'), S.qrows, S.queue.jobs, (j) => j.job_id, makeQRow, paintQRow);
  $('queue-empty').hidden = S.queue.jobs.length > 0;
}
function makeQRow(j) {
  const row = { pid: null };
  row.prio = isOp()
    ? h('div', { class: 'prio' },
      h('button', { type: 'button', 'data-action': 'prio-down', 'aria-label': 'Lower priority' }, '−'),
      row.input = h('input', { type: 'number', step: 1, 'data-action': 'priority', 'aria-label': 'Priority of ' + j.name }),
      h('button', { type: 'button', 'data-action': 'prio-up', 'aria-label': 'Raise priority' }, '+'))
    : h('b');
  row.name = h('div', { class: 'jname' }); row.jid = h('div', { class: 'jid' }, j.job_id);
  row.state = h('span'); row.printer = h('span');
  row.fill = h('div', { class: 'bar-fill' }); row.pct = h('span', { class: 'num' });
  row.prog = h('div', { class: 'qprog' }, h('div', { class: 'bar' }, row.fill), row.pct);
  row.tags = h('td', { 'data-label': 'Tags' });
  row.sub = td('Submitted');
  row.acts = td('', 'acts');
  row.el = h('tr', { 'data-job': j.job_id }, td('Priority', null, row.prio), td('Job', 'wide', row.name, row.jid), td('State', null, row.state),
    td('Printer', null, row.printer), td('Progress', null, row.prog), row.tags, row.sub, row.acts);
  if (isOp()) row.acts.append(h('button', { type: 'button', class: 'danger', 'data-action': 'cancel' }, 'Cancel'));
  return row;
}
function paintQRow(row, j) {
  setText(row.name, j.name); row.name.title = j.name;
  stateCell(row, j.state);
  printerCell(row, j.printer_id);
  const p = j.progress_pct;
  row.prog.hidden = p == null;
  if (p != null) { row.fill.style.width = pct(p) + '%'; row.fill.parentNode.parentNode.className = 'qprog s-' + j.state; setText(row.pct, Math.floor(pct(p)) + '%'); }
  if (row.input) {
    if (document.activeElement !== row.input && !S.inflight.has('prio:' + j.job_id)) row.input.value = j.priority;
  } else setText(row.prio, j.priority);
  tagsCell(row.tags, j.tags);
  setText(row.sub, fmtWhen(j.submitted_at_ms));
  row.sub.title = j.submitted_at_ms ? new Date(j.submitted_at_ms).toLocaleString() : '';
}
function queueClick(ev) {
  const btn = ev.target.closest('button[data-action]');
  if (!btn) return;
  const id = btn.closest('tr').dataset.job;
  const j = S.queue.jobs.find((x) => x.job_id === id);
  const a = btn.dataset.action;
  if (a === 'cancel') {
    if (!window.confirm(`Cancel "${j ? j.name : id}"?`)) return;
    run(btn, 'job:' + id + ':cancel', `${id} · cancel`, 'POST', `/jobs/${enc(id)}/cancel`);
  } else if (a === 'prio-up' || a === 'prio-down') {
    const row = S.qrows.get(id);
    const cur = parseInt(row && row.input ? row.input.value : j && j.priority, 10) || 0;
    const next = cur + (a === 'prio-up' ? 1 : -1);
    if (row && row.input) row.input.value = next;
    setPriority(id, next, btn);
  }
}
function setPriority(id, value, el) {
  if (!Number.isInteger(value)) { toast(false, `${id} · priority: not a whole number`); return; }
  const key = 'prio:' + id;
  if (S.inflight.has(key)) return;
  const tr = el.closest('tr');
  const ctrls = tr ? tr.querySelectorAll('.prio button, .prio input') : [];
  ctrls.forEach((c) => { c.disabled = true; });
  run(null, key, `${id} · priority ${value}`, 'PUT', `/jobs/${enc(id)}/priority`, { priority: value }, () => {
    ctrls.forEach((c) => { c.disabled = false; });
    const j = S.queue.jobs.find((x) => x.job_id === id), row = S.qrows.get(id);
    if (j && row) paintQRow(row, j);
  });
}

// ---------- upload and submit ----------
function initUpload() {
  const drop = $('drop'), file = $('file');
  const pick = (f) => {
    S.file = f || null;
    setText($('file-name'), f ? `${f.name} · ${fmtMiB(f.size)} MiB` : '');
    if (f) $('j-name').value = f.name;
    if (crypto.subtle) setText($('submit-result'), '');
  };
  file.addEventListener('change', () => pick(file.files[0]));
  for (const t of ['dragenter', 'dragover']) drop.addEventListener(t, (ev) => { ev.preventDefault(); drop.classList.add('drag'); });
  for (const t of ['dragleave', 'drop']) drop.addEventListener(t, () => drop.classList.remove('drag'));
  drop.addEventListener('drop', (ev) => { ev.preventDefault(); if (ev.dataTransfer.files.length) pick(ev.dataTransfer.files[0]); });
  // a file dropped next to the zone must not navigate away from the page
  window.addEventListener('dragover', (ev) => ev.preventDefault());
  window.addEventListener('drop', (ev) => ev.preventDefault());
  $('submit-form').addEventListener('submit', (ev) => { ev.preventDefault(); submitJob(); });
  if (!(window.crypto && crypto.subtle)) {
    result(false, `This page is not a secure context (${location.origin}), so the browser offers no SHA-256: ` +
      'open it over https or as http://127.0.0.1 / http://localhost to upload here.');
    $('submit').disabled = true;
  }
}
function result(ok, text) { const r = $('submit-result'); setText(r, text); r.className = 'result ' + (ok ? 'ok' : 'err'); }
function progress(frac, text) {
  $('up').hidden = false;
  $('up-bar').style.width = (frac * 100).toFixed(1) + '%';
  setText($('up-status'), text);
}
const RETRYABLE = (e) => e.code === 'network' || e.status >= 500 || e.status === 429 || e.code === 'busy' || e.code === 'upload_refused';

async function submitJob() {
  const f = S.file;
  if (S.uploading) return;
  if (!f) { result(false, 'Choose a .gcode file first.'); return; }
  if (!f.size) { result(false, 'That file is empty.'); return; }
  if (!(window.crypto && crypto.subtle)) { result(false, 'SHA-256 is unavailable: this page is not a secure context (use https, 127.0.0.1 or localhost).'); return; }
  const copies = parseInt($('j-copies').value, 10) || 1;
  const priority = parseInt($('j-priority').value, 10) || 0;
  const tags = $('j-tags').value.split(',').map((s) => s.trim()).filter(Boolean);
  const name = $('j-name').value.trim() || f.name;
  S.uploading = true;
  $('submit').disabled = true;
  setText($('submit-result'), '');
  let tries = 0;
  const retry = async (e, what) => {
    if (++tries > 20) throw e;
    const ms = (e.body && e.body.retry_after_ms) || Math.min(5000, 250 * 2 ** tries);
    setText($('up-status'), `${what}: ${errText(e)}; retrying in ${(ms / 1000).toFixed(1)} s (attempt ${tries} of 20)`);
    await sleep(ms);
  };
  try {
    progress(0, 'Computing SHA-256…');
    const sha = Array.from(new Uint8Array(await crypto.subtle.digest('SHA-256', await f.arrayBuffer())),
      (b) => b.toString(16).padStart(2, '0')).join('');
    const total = f.size;
    let off = null, first = true;
    while (true) {
      try {
        if (off === null) {
          const st = await api('GET', `/files/${sha}`);
          off = st && st.complete ? total : Math.max(0, Math.min(total, Number(st && st.received) || 0));
          if (first && off > 0) setText($('submit-result'), off >= total ? 'The server already has this file.' : `Resuming at ${fmtMiB(off)} MiB.`);
          first = false;
        }
        if (off >= total) break;
        progress(off / total, `Uploading ${fmtMiB(off)} / ${fmtMiB(total)} MiB (${Math.floor((off / total) * 100)}%)`);
        const end = Math.min(total, off + CHUNK);
        const r = await api('PUT', `/files/${sha}?offset=${off}&total_size=${total}`, {
          body: f.slice(off, end), headers: { 'Content-Type': 'application/octet-stream' },
        });
        const got = Number(r && r.received);
        off = isFinite(got) && got > 0 ? got : end;
        tries = 0;
      } catch (e) {
        if (!RETRYABLE(e)) throw e;
        off = null; // ask the server what it has, then go on from there
        await retry(e, 'Upload interrupted');
      }
    }
    progress(1, `Uploaded ${fmtMiB(total)} MiB. Queuing…`);
    const idem = uuid(); // one key for this submit, reused by its retries
    let res;
    tries = 0;
    while (true) {
      try {
        res = await api('POST', '/jobs', { json: { name, sha256: sha, copies, priority, tags }, idem });
        break;
      } catch (e) {
        if (!RETRYABLE(e) || e.code === 'upload_refused') throw e;
        await retry(e, 'Submit failed');
      }
    }
    const ids = (res && res.job_ids) || [];
    progress(1, 'Done.');
    result(true, `Queued ${ids.length} job${ids.length === 1 ? '' : 's'}: ${ids.join(', ')}`);
    toast(true, `${name}: queued ${ids.join(', ')}`);
    if (S.file === f) { S.file = null; $('file').value = ''; $('j-name').value = ''; setText($('file-name'), ''); }
  } catch (e) {
    result(false, `Refused: ${errText(e)}`);
    setText($('up-status'), 'Stopped.');
  } finally {
    S.uploading = false;
    $('submit').disabled = false;
  }
}

// ---------- history ----------
function initHistory() {
  $('history-refresh').addEventListener('click', () => loadHistory());
  for (const id of ['history-body', 'p-jobs-body']) $(id).addEventListener('click', (ev) => {
    const btn = ev.target.closest('button[data-action=requeue]');
    if (!btn) return;
    const jid = btn.closest('tr').dataset.job;
    run(btn, 'job:' + jid + ':requeue', `${jid} · requeue`, 'POST', `/jobs/${enc(jid)}/requeue`);
  });
  $('p-forget').addEventListener('click', (ev) => {
    const id = S.detailId;
    if (!id || !window.confirm(`Forget printer ${id}? It disappears from the fleet until it announces itself again.`)) return;
    run(ev.currentTarget, id + ':forget', `${id} · forget`, 'DELETE', `/printers/${enc(id)}`, undefined, (ok) => { if (ok) location.hash = '#/grid'; });
  });
}
let histLoading = false;
async function loadHistory() {
  if (histLoading) return;
  histLoading = true;
  try {
    const d = await api('GET', '/history?limit=500');
    S.hist = (d && d.jobs) || [];
    S.util = (d && d.utilisation) || [];
    renderHistory();
  } catch (e) {
    if (e.status !== 401) toast(false, 'History: ' + errText(e));
  } finally { histLoading = false; }
}
function applyHistory(d) {
  const ended = (d && d.ended) || [];
  if (!ended.length) return;
  const ids = new Set(ended.map((j) => j.job_id));
  S.hist = ended.concat(S.hist.filter((j) => !ids.has(j.job_id))).slice(0, 500);
  if (S.view === 'history') renderHistory();
  if (S.view === 'printer' && ended.some((j) => j.printer_id === S.detailId)) scheduleDetail();
}
const ENDED = new Set(['finished', 'failed', 'cancelled', 'interrupted', 'timed_out', 'done']);
function makeHRow(j) {
  const row = { pid: null };
  row.when = td('When'); row.name = h('div', { class: 'jname' }); row.state = h('span'); row.printer = h('span');
  row.dur = td('Duration', 'num'); row.reason = td('Reason', 'reason wide'); row.acts = td('', 'acts');
  row.el = h('tr', { 'data-job': j.job_id }, row.when, td('Job', 'wide', row.name, h('div', { class: 'jid' }, j.job_id)),
    td('Outcome', null, row.state), td('Printer', null, row.printer), row.dur, row.reason, row.acts);
  return row;
}
function paintHRow(row, j) {
  const at = j.ended_at_ms || j.started_at_ms || j.submitted_at_ms;
  setText(row.when, fmtWhen(at)); row.when.title = at ? new Date(at).toLocaleString() : '';
  setText(row.name, j.name); row.name.title = j.name;
  stateCell(row, j.state);
  printerCell(row, j.printer_id);
  setText(row.dur, j.started_at_ms ? fmtDur(((j.ended_at_ms || Date.now()) - j.started_at_ms) / 1000) : '—');
  setText(row.reason, j.reason || '');
  const want = isOp() && ENDED.has(j.state);
  if (want !== !!row.btn) {
    if (want) row.acts.append(row.btn = h('button', { type: 'button', 'data-action': 'requeue' }, 'Requeue'));
    else { row.btn.remove(); row.btn = null; }
  }
}
function renderHistory() {
  syncRows($('history-body'), S.hrows, S.hist, (j) => j.job_id, makeHRow, paintHRow);
  $('history-empty').hidden = S.hist.length > 0;
  syncRows($('util-body'), S.urows, S.util, (u) => u.printer_id, (u) => {
    const row = { pid: null, printer: h('span'), fin: td('Finished', 'num'), fail: td('Failed', 'num'), pr: td('Printing', 'num'), fill: h('div', { class: 'bar-fill' }), pct: h('span', { class: 'num' }) };
    row.el = h('tr', { 'data-printer-util': u.printer_id }, td('Printer', null, row.printer), row.fin, row.fail, row.pr,
      td('Utilisation', 'wide', h('div', { class: 'ubar' }, h('div', { class: 'bar' }, row.fill), row.pct)));
    return row;
  }, (row, u) => {
    printerCell(row, u.printer_id);
    setText(row.fin, u.jobs_finished); setText(row.fail, u.jobs_failed); setText(row.pr, fmtDur(u.printing_s));
    row.fill.style.width = pct(u.utilisation_pct) + '%';
    setText(row.pct, pct(u.utilisation_pct).toFixed(1) + '%');
  });
}

// ---------- printer page ----------
function closePrinter() {
  S.detailId = null; S.detailView = null; S.detailT = null; clearTimeout(S.detailTimer); S.detailTimer = 0;
  $('p-tile').replaceChildren();
}
function openPrinter(id) {
  if (S.detailId !== id) {
    closePrinter();
    S.detailId = id;
    S.detailView = makeTile(id, true);
    $('p-tile').append(S.detailView.el);
    setText($('p-title'), id);
    setText($('p-error'), '');
    $('p-events').replaceChildren();
    S.prows.clear(); $('p-jobs-body').replaceChildren();
    $('p-forget').hidden = !isOp();
    const e = S.tiles.get(id);
    S.detailT = e ? e.t : null;
    if (e) paintTile(S.detailView, e.t, true); else S.detailView.el.hidden = true;
  }
  loadDetail(id);
}
function scheduleDetail() {
  if (S.detailTimer || !S.detailId) return;
  S.detailTimer = setTimeout(() => { S.detailTimer = 0; if (S.detailId) loadDetail(S.detailId); }, 2000);
}
async function loadDetail(id) {
  let d;
  try { d = await api('GET', `/printers/${enc(id)}`); } catch (e) {
    if (S.detailId === id) setText($('p-error'), e.status === 404 ? `No printer called ${id}.` : `Could not load ${id}: ${errText(e)}`);
    return;
  }
  if (S.detailId !== id || !d) return;
  setText($('p-error'), '');
  const e = S.tiles.get(id);
  const t = e && (!d.tile || e.t.version >= d.tile.version) ? e.t : d.tile;
  if (t) {
    S.detailT = t;
    S.detailView.el.hidden = false;
    paintTile(S.detailView, t, true);
  }
  const ev = (d.events || []).map((x) => h('li', null,
    h('time', { datetime: new Date(x.at_ms).toISOString(), title: new Date(x.at_ms).toLocaleString() }, fmtClock(x.at_ms)),
    h('span', { class: 'kind' }, x.kind), h('span', { class: 'txt' }, x.text)));
  $('p-events').replaceChildren(...(ev.length ? ev : [h('li', { class: 'muted' }, 'No events yet.')]));
  syncRows($('p-jobs-body'), S.prows, d.jobs || [], (j) => j.job_id, makeHRow, paintHRow);
}

boot();
