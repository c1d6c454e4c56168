// evbus portal: plain JavaScript, no framework, no build step (docs/adr/0013-portal.md).
//
// Rules this file keeps (a unit test checks the mechanical ones):
// - the API key lives in `session.key`, a variable of this module: never in a cookie, the
//   browser's storage or a URL, and it is dropped on sign-out or on the first 401;
// - everything shown that comes from the API goes through textContent or attributes (`el`
//   below), never through HTML strings (the page's CSP requires Trusted Types, so an HTML
//   string sink would throw anyway);
// - the portal calls the public HTTP API with the signed-in key only, so every scope is the
//   API's decision, not the portal's.

let session = null;
/** Background work of the current session: timers and the live-tail stream. */
const work = { timers: new Set(), tail: null };

const $ = (id) => document.getElementById(id);

/** Creates an element: props set as properties (booleans, listeners) or attributes. */
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (v === undefined || v === null) continue;
    if (k === 'class') node.className = v;
    else if (k === 'text') node.textContent = String(v);
    else if (k.startsWith('on') && typeof v === 'function') node.addEventListener(k.slice(2), v);
    else if (typeof v === 'boolean') node[k] = v;
    else node.setAttribute(k, String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : String(c));
  }
  return node;
}

function clear(node) {
  node.replaceChildren();
  return node;
}

function when(value) {
  if (!value) return '—';
  const d = new Date(value);
  if (Number.isNaN(d.getTime())) return String(value);
  return d.toISOString().replace('T', ' ').replace(/\.\d+Z$/, ' UTC').replace(/Z$/, ' UTC');
}

/** `datetime-local` value for a Date, in local time. */
function localInput(d) {
  const pad = (n) => String(n).padStart(2, '0');
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T${pad(d.getHours())}:${pad(d.getMinutes())}`;
}

function notice(text) {
  $('notice').textContent = text || '';
}

// ---- the API -------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, problem) {
    super((problem && (problem.detail || problem.title)) || `HTTP ${status}`);
    this.status = status;
    this.problem = problem || {};
  }
}

/** A problem as a sentence a person can act on; `names` maps *_positions back to names. */
function problemText(err, names) {
  if (!(err instanceof ApiError)) return String(err && err.message ? err.message : err);
  const p = err.problem;
  let text = err.status ? `${err.status} ${p.title || ''}`.trim() : 'No answer';
  if (p.detail) text += `: ${p.detail}`;
  for (const field of ['denied_positions', 'invalid_positions']) {
    if (Array.isArray(p[field]) && names) {
      const named = p[field].map((i) => names[i]).filter((n) => n !== undefined);
      if (named.length) text += ` (${named.join(', ')})`;
    }
  }
  if (p.limit !== undefined) text += ` (limit ${p.limit})`;
  return text;
}

/** Until when (ms since the epoch) the gateway asked this tab to hold its reads back: the
 * `Retry-After` of the last 429. Reads wait it out, together, rather than failing (the
 * delivery overview reads one attempt log per endpoint, more than a key's burst). */
let readsNotBefore = 0;
/** Longest a read waits out 429s, in all, before it fails like any other error. */
const READ_WAIT_MAX_MS = 30000;
const pause = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function api(method, path, body) {
  const current = session;
  if (!current) throw new ApiError(401, { title: 'Unauthorized', detail: 'signed out' });
  const headers = { Authorization: `Bearer ${current.key}`, Accept: 'application/json' };
  const init = { method, headers, cache: 'no-store', credentials: 'omit', redirect: 'error' };
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const read = method === 'GET';
  let waited = 0;
  let resp;
  for (;;) {
    const hold = readsNotBefore - Date.now();
    if (read && hold > 0) {
      await pause(hold);
      waited += hold;
      if (session !== current) throw new ApiError(401, { title: 'Unauthorized', detail: 'signed out' });
    }
    try {
      resp = await fetch(path, init);
    } catch (e) {
      throw new ApiError(0, { detail: `the gateway did not answer (${e.message})` });
    }
    if (!read || resp.status !== 429) break;
    // A read refused for the key's rate limit is asked again once the gateway says so.
    const after = Number(resp.headers.get('Retry-After'));
    const wait = (Number.isFinite(after) && after > 0 ? after : 1) * 1000;
    if (waited + wait > READ_WAIT_MAX_MS) break;
    readsNotBefore = Math.max(readsNotBefore, Date.now() + wait);
  }
  const text = await resp.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = { detail: text.slice(0, 200) };
  }
  if (resp.status === 401) {
    refused(current);
    throw new ApiError(401, data);
  }
  if (!resp.ok) throw new ApiError(resp.status, data);
  return data;
}

/** The gateway refused the key of `which` session: forget it and say so. */
function refused(which) {
  if (session !== which) return;
  signOut('The gateway refused this key (revoked, expired or not a valid key). Sign in with a valid key.');
}

// ---- session -------------------------------------------------------------------------------

const VIEWS = ['types', 'webhooks', 'tail', 'keys', 'deliveries'];
let viewLoads = 0;

async function signIn(key) {
  const mine = { key, admin: false, types: [], view: null };
  session = mine;
  $('signin-error').textContent = '';
  let types;
  try {
    types = await api('GET', '/v1/event-types');
  } catch (e) {
    if (session === mine) session = null;
    if (e.status === 401) $('key').value = '';
    $('signin-error').textContent = e.status === 401
      ? 'The gateway refused this key (revoked, expired or not a valid key).'
      : `Could not sign in: ${problemText(e)}`;
    return;
  }
  if (session !== mine) return;
  mine.types = types;
  try {
    await api('GET', '/v1/keys');
    mine.admin = true;
  } catch (e) {
    if (session !== mine) return;
    if (e.status !== 403) notice(`Could not tell whether this is an admin key: ${problemText(e)}`);
  }
  $('key').value = '';
  $('view-signin').hidden = true;
  $('nav').hidden = false;
  $('signout').hidden = false;
  const who = $('who');
  who.hidden = false;
  who.textContent = `Signed in with key ${key.split('_').slice(0, 2).join('_')}…${mine.admin ? ' (admin)' : ''}`;
  for (const li of document.querySelectorAll('.admin-only')) li.hidden = !mine.admin;
  fillTypeChoices();
  show('types');
}

function signOut(message) {
  session = null;
  stopTail();
  for (const t of work.timers) clearInterval(t);
  work.timers.clear();
  for (const id of ['types-list', 'wh-list', 'wh-detail', 'wh-secret', 'tail-events', 'keys-list', 'key-new', 'deliveries']) {
    clear($(id));
  }
  for (const id of ['wh-detail', 'wh-secret', 'key-new']) $(id).hidden = true;
  for (const id of ['wh-create-error', 'key-create-error']) $(id).textContent = '';
  for (const v of VIEWS) $(`view-${v}`).hidden = true;
  $('nav').hidden = true;
  $('signout').hidden = true;
  $('who').hidden = true;
  $('who').textContent = '';
  $('view-signin').hidden = false;
  $('signin-error').textContent = message || '';
  notice(message ? '' : 'Signed out: the key is forgotten.');
  $('key').focus();
}

function show(view) {
  if (!session) return;
  session.view = view;
  for (const v of VIEWS) $(`view-${v}`).hidden = v !== view;
  for (const b of document.querySelectorAll('nav button')) {
    if (b.dataset.view === view) b.setAttribute('aria-current', 'page');
    else b.removeAttribute('aria-current');
  }
  notice('');
  $(`${view}-title`).focus();
  const load = { types: renderTypes, webhooks: loadWebhooks, tail: () => {}, keys: loadKeys, deliveries: loadDeliveries }[view];
  // The view is marked busy until its content is rebuilt, for assistive technology (and for
  // anything that must not act on the content it is about to replace).
  const section = $(`view-${view}`);
  const turn = ++viewLoads;
  section.setAttribute('aria-busy', 'true');
  Promise.resolve(load())
    .catch((e) => notice(problemText(e)))
    .finally(() => { if (turn === viewLoads) section.removeAttribute('aria-busy'); });
}

// ---- event types ---------------------------------------------------------------------------

function typeName(s) {
  if (!s || typeof s !== 'object') return 'any';
  if ('const' in s) return `constant ${JSON.stringify(s.const)}`;
  if (Array.isArray(s.enum)) return `one of ${s.enum.map((v) => JSON.stringify(v)).join(', ')}`;
  let t = Array.isArray(s.type) ? s.type.join(' or ') : s.type;
  if (!t && s.properties) t = 'object';
  if (!t && (s.anyOf || s.oneOf)) t = (s.anyOf || s.oneOf).map(typeName).join(' or ');
  if (t === 'array' && s.items) t = `array of ${typeName(s.items)}`;
  if (s.format) t = `${t || 'string'} (${s.format})`;
  return t || 'any';
}

function rules(s) {
  const out = [];
  const names = { minLength: 'at least %s character%p', maxLength: 'at most %s character%p', minimum: '≥ %s', maximum: '≤ %s', exclusiveMinimum: '> %s', exclusiveMaximum: '< %s', minItems: 'at least %s item%p', maxItems: 'at most %s item%p', pattern: 'matches %s' };
  for (const [k, f] of Object.entries(names)) {
    if (s && s[k] !== undefined) out.push(f.replace('%s', String(s[k])).replace('%p', s[k] === 1 ? '' : 's'));
  }
  return out.join('; ');
}

/** Rows {path, type, required, description, rules} of every declared field, depth-first. */
function fields(schema, prefix = '', required = [], out = [], depth = 0) {
  if (!schema || typeof schema !== 'object' || depth > 12) return out;
  const branches = [schema, ...(schema.allOf || [])];
  for (const b of branches) {
    const req = new Set([...(b.required || []), ...required]);
    for (const [name, sub] of Object.entries(b.properties || {})) {
      const path = prefix ? `${prefix}.${name}` : name;
      out.push({ path, type: typeName(sub), required: req.has(name), description: sub.description || '', rules: rules(sub) });
      fields(sub, path, [], out, depth + 1);
      const items = sub.items && typeof sub.items === 'object' ? sub.items : null;
      if (items) fields(items, `${path}[]`, [], out, depth + 1);
      for (const alt of [...(sub.anyOf || []), ...(sub.oneOf || [])]) fields(alt, path, [], out, depth + 1);
    }
  }
  return out;
}

function fieldTable(schema, caption) {
  const rows = fields(schema);
  if (!rows.length) return el('p', { class: 'help', text: 'No declared fields.' });
  return el('table', {},
    el('caption', { text: caption }),
    el('thead', {}, el('tr', {}, ['Field', 'Type', 'Required', 'Rules', 'Description'].map((h) => el('th', { scope: 'col', text: h })))),
    el('tbody', {}, rows.map((r) => el('tr', {},
      el('td', {}, el('code', { text: r.path })),
      el('td', { text: r.type }),
      el('td', { text: r.required ? 'yes' : 'no' }),
      el('td', { text: r.rules }),
      el('td', { text: r.description })))));
}

function changes(older, newer) {
  const a = new Map(fields(older).map((r) => [r.path, r.type]));
  const b = new Map(fields(newer).map((r) => [r.path, r.type]));
  const added = [...b.keys()].filter((k) => !a.has(k));
  const removed = [...a.keys()].filter((k) => !b.has(k));
  const retyped = [...b.keys()].filter((k) => a.has(k) && a.get(k) !== b.get(k));
  const parts = [];
  if (added.length) parts.push(`added ${added.join(', ')}`);
  if (removed.length) parts.push(`removed ${removed.join(', ')}`);
  if (retyped.length) parts.push(`changed the type of ${retyped.join(', ')}`);
  return parts.length ? parts.join('; ') : 'no field added, removed or retyped';
}

function renderTypes() {
  const list = clear($('types-list'));
  const types = session.types;
  if (!types.length) {
    list.append(el('p', { text: 'This key may not subscribe to or publish any event type.' }));
    return;
  }
  list.append(el('p', { class: 'help', text: `${types.length} event type${types.length === 1 ? '' : 's'}.` }));
  for (const t of types) {
    const versions = Array.isArray(t.versions) ? t.versions : [];
    list.append(el('article', { class: 'type', 'data-type': t.type, 'aria-labelledby': `type-${t.type}` },
      el('h3', { id: `type-${t.type}` }, el('code', { text: t.type })),
      el('p', { class: 'meta' }, `version ${t.version}`, t.dataschema ? ' · ' : '', t.dataschema ? el('code', { text: t.dataschema }) : '',
        ` · this key may ${[t.subscribe ? 'subscribe' : '', t.publish ? 'publish' : ''].filter(Boolean).join(' and ')}`),
      t.description ? el('p', { text: t.description }) : null,
      fieldTable(t.schema, `Fields of ${t.type}`),
      el('h4', { text: 'Example payload' }),
      el('pre', { class: 'example', tabindex: '0', 'aria-label': `Example payload of ${t.type}` }, el('code', { text: JSON.stringify(t.example, null, 2) })),
      el('h4', { text: 'Version history' }),
      el('ol', { class: 'versions' }, versions.map((v, i) => el('li', {},
        el('strong', { text: `version ${v.version}` }), ' ',
        el('code', { text: v.dataschema }),
        v.description ? ` — ${v.description}` : '',
        el('br'),
        i === 0 ? 'first version' : `since version ${versions[i - 1].version}: ${changes(versions[i - 1].schema, v.schema)}`,
        el('details', {}, el('summary', { text: `JSON Schema of version ${v.version}` }),
          el('pre', { tabindex: '0' }, el('code', { text: JSON.stringify(v.schema, null, 2) })))))),
      el('details', {}, el('summary', { text: 'Curated JSON Schema (latest)' }),
        el('pre', { tabindex: '0' }, el('code', { text: JSON.stringify(t.schema, null, 2) })))));
  }
}

function fillTypeChoices() {
  const names = session.types.filter((t) => t.subscribe).map((t) => t.type);
  const box = $('wh-types');
  for (const n of [...box.children]) if (n.tagName !== 'LEGEND') n.remove();
  if (!names.length) box.append(el('p', { text: 'This key may not subscribe to any event type.' }));
  names.forEach((name, i) => box.append(el('div', { class: 'check' },
    el('input', { type: 'checkbox', id: `wh-type-${i}`, value: name }),
    el('label', { for: `wh-type-${i}`, text: name }))));
  const sel = $('tail-type');
  for (const o of [...sel.options].slice(1)) o.remove();
  for (const name of names) sel.append(el('option', { value: name, text: name }));
}

// ---- webhooks ------------------------------------------------------------------------------

function secretBox(box, title, secret, extra) {
  clear(box);
  box.hidden = false;
  box.append(
    el('p', {}, el('strong', { text: title })),
    el('p', {}, el('code', { class: 'secret-value', text: secret })),
    el('p', { text: 'Copy it now: it is shown only once. The gateway signs every delivery with it (Standard Webhooks).' }),
    extra ? el('p', { text: extra }) : null,
    el('button', { type: 'button', class: 'secondary', text: 'I have copied it', onclick: () => { clear(box); box.hidden = true; } }));
  box.querySelector('button').focus();
}

async function createWebhook(ev) {
  ev.preventDefault();
  const err = $('wh-create-error');
  err.textContent = '';
  const url = $('wh-url').value.trim();
  const types = [...$('wh-types').querySelectorAll('input:checked')].map((c) => c.value);
  if (!url) { err.textContent = 'Give the endpoint URL.'; $('wh-url').focus(); return; }
  if (!types.length) { err.textContent = 'Choose at least one event type.'; return; }
  try {
    const made = await api('POST', '/v1/webhooks', { url, event_types: types, description: $('wh-desc').value });
    $('wh-url').value = '';
    $('wh-desc').value = '';
    for (const c of $('wh-types').querySelectorAll('input')) c.checked = false;
    await loadWebhooks();
    secretBox($('wh-secret'), `Webhook created. Its signing secret:`, made.secret);
  } catch (e) {
    err.textContent = `The webhook was not created. ${problemText(e, types)}`;
  }
}

async function loadWebhooks() {
  const hooks = await api('GET', '/v1/webhooks');
  const list = clear($('wh-list'));
  if (!hooks.length) {
    list.append(el('p', { text: 'No webhook yet.' }));
    return;
  }
  list.append(el('ul', { class: 'hooks plain' }, hooks.map((w) => el('li', { class: 'card', 'data-webhook': w.id },
    el('h4', {}, el('code', { text: w.url })),
    w.description ? el('p', { text: w.description }) : null,
    el('p', {}, state(w)),
    el('p', {}, 'Types: ', w.event_types.map((t) => el('span', { class: 'pill', text: t }))),
    el('button', { type: 'button', class: 'secondary', text: 'Manage', 'aria-label': `Manage the webhook to ${w.url}`, onclick: () => openWebhook(w.id) })))));
  const open = $('wh-detail').dataset.webhook;
  if (open && !hooks.some((w) => w.id === open)) closeWebhook();
}

function state(w) {
  if (!w.enabled) return el('span', { class: 'bad', text: `Disabled${w.disabled_reason ? `: ${w.disabled_reason}` : ''}` });
  if (w.failing_since) return el('span', { class: 'warn', text: `Enabled, failing since ${when(w.failing_since)}` });
  return el('span', { class: 'ok', text: 'Enabled' });
}

function closeWebhook() {
  const d = $('wh-detail');
  if (d.timer) { clearInterval(d.timer); work.timers.delete(d.timer); d.timer = null; }
  clear(d);
  d.hidden = true;
  delete d.dataset.webhook;
}

async function openWebhook(id) {
  closeWebhook();
  const w = await api('GET', `/v1/webhooks/${encodeURIComponent(id)}`).catch((e) => { notice(problemText(e)); return null; });
  if (!w) return;
  const d = $('wh-detail');
  d.dataset.webhook = id;
  d.hidden = false;
  const status = el('p', { id: 'wh-status', role: 'status', 'aria-live': 'polite', class: 'status' });
  const error = el('p', { id: 'wh-error', class: 'error', role: 'alert' });
  const say = (t) => { status.textContent = t; error.textContent = ''; };
  const fail = (what, e, names) => { error.textContent = `${what}: ${problemText(e, names)}`; };
  const names = [...new Set([...session.types.filter((t) => t.subscribe).map((t) => t.type), ...w.event_types])];
  const typeBoxes = names.map((n, i) => el('div', { class: 'check' },
    el('input', { type: 'checkbox', id: `wh-edit-type-${i}`, value: n, checked: w.event_types.includes(n) }),
    el('label', { for: `wh-edit-type-${i}`, text: n })));
  const since = el('input', { type: 'datetime-local', id: 'replay-since', step: '1' });
  since.value = localInput(new Date(Date.now() - 3600 * 1000));
  const secret = el('div', { class: 'secret', hidden: true });
  const confirm = el('div', { class: 'buttons', hidden: true },
    el('span', { text: 'Delete this webhook and its pending deliveries?' }),
    el('button', { type: 'button', class: 'danger', id: 'wh-delete-confirm', text: 'Delete for good', onclick: async () => {
      try {
        await api('DELETE', `/v1/webhooks/${encodeURIComponent(id)}`);
        closeWebhook();
        notice('Webhook deleted.');
        await loadWebhooks();
      } catch (e) { fail('Not deleted', e); }
    } }),
    el('button', { type: 'button', class: 'secondary', text: 'Cancel', onclick: () => { confirm.hidden = true; } }));
  const attempts = el('div', { id: 'wh-attempts' });
  const auto = el('input', { type: 'checkbox', id: 'wh-auto', checked: true });

  d.append(
    el('h3', { id: 'wh-detail-title' }, 'Webhook ', el('code', { text: w.url })),
    el('p', {}, state(w), ' · created ', when(w.created_at), ' · id ', el('code', { text: w.id })),
    status, error,
    el('fieldset', {}, el('legend', { text: 'Event types' }), typeBoxes,
      el('button', { type: 'button', id: 'wh-save-types', text: 'Save event types', onclick: async () => {
        const chosen = typeBoxes.map((b) => b.querySelector('input')).filter((c) => c.checked).map((c) => c.value);
        if (!chosen.length) { error.textContent = 'Choose at least one event type.'; return; }
        try {
          await api('PATCH', `/v1/webhooks/${encodeURIComponent(id)}`, { event_types: chosen });
          say(`Event types saved: ${chosen.join(', ')}.`);
          await loadWebhooks();
        } catch (e) { fail('Event types not saved', e, chosen); }
      } })),
    el('div', { class: 'buttons' },
      el('button', { type: 'button', id: 'wh-rotate', text: 'Rotate secret', onclick: async () => {
        const rotate = (query) => api('POST', `/v1/webhooks/${encodeURIComponent(id)}/rotate-secret${query}`);
        try {
          let r;
          try {
            r = await rotate('');
          } catch (e) {
            // A rotation is under way: rotating again stops the previous secret now.
            if (e.status !== 409 || !window.confirm(`The previous secret still signs until ${when(e.problem.previous_secret_until)}. Rotating again stops it now: receivers that have not switched to the current secret will fail. Rotate anyway?`)) throw e;
            r = await rotate('?retire_previous=true');
          }
          secretBox(secret, 'New signing secret:', r.secret, r.previous_secret_expires_at ? `The previous secret also signs until ${when(r.previous_secret_expires_at)}.` : '');
        } catch (e) { fail('Secret not rotated', e); }
      } }),
      w.enabled ? null : el('button', { type: 'button', id: 'wh-enable', text: 'Re-enable', onclick: async () => {
        try {
          await api('PATCH', `/v1/webhooks/${encodeURIComponent(id)}`, { enabled: true });
          await loadWebhooks();
          await openWebhook(id);
          $('wh-status').textContent = 'Re-enabled: deliveries run again.';
        } catch (e) { fail('Not re-enabled', e); }
      } }),
      el('button', { type: 'button', class: 'danger', id: 'wh-delete', text: 'Delete', onclick: () => { confirm.hidden = false; $('wh-delete-confirm').focus(); } }),
      el('button', { type: 'button', class: 'secondary', text: 'Close', onclick: closeWebhook })),
    confirm,
    secret,
    el('div', { class: 'row' },
      el('div', {}, el('label', { for: 'replay-since', text: 'Replay the events logged since (your local time)' }), since),
      el('div', { class: 'buttons' }, el('button', { type: 'button', id: 'wh-replay', text: 'Replay', onclick: async () => {
        const at = new Date(since.value);
        if (Number.isNaN(at.getTime())) { error.textContent = 'Give a date and time to replay from.'; return; }
        try {
          const r = await api('POST', `/v1/webhooks/${encodeURIComponent(id)}/replay`, { since: at.toISOString() });
          say(`Replay queued ${r.replayed} event${r.replayed === 1 ? '' : 's'} for delivery.` +
            (r.budget_exhausted ? ` The replay budget is used up${r.budget_resets_at ? ` until ${when(r.budget_resets_at)}` : ''}.` : ''));
          await refreshAttempts();
        } catch (e) { fail('Not replayed', e); }
      } }))),
    el('h4', { text: 'Attempt log (newest first)' }),
    el('div', { class: 'buttons' },
      el('div', { class: 'check' }, auto, el('label', { for: 'wh-auto', text: 'Refresh every 2 seconds' })),
      el('button', { type: 'button', class: 'secondary', id: 'wh-refresh', text: 'Refresh now', onclick: () => refreshAttempts() })),
    attempts);

  async function refreshAttempts() {
    try {
      const list = await api('GET', `/v1/webhooks/${encodeURIComponent(id)}/attempts`);
      if ($('wh-detail').dataset.webhook !== id) return;
      clear(attempts).append(attemptTable(list));
    } catch (e) {
      if (e.status !== 401) fail('Attempts not loaded', e);
    }
  }
  await refreshAttempts();
  d.timer = setInterval(() => { if (auto.checked && session && session.view === 'webhooks') refreshAttempts(); }, 2000);
  work.timers.add(d.timer);
  $('wh-detail-title').scrollIntoView({ block: 'nearest' });
  d.querySelector('#wh-save-types').focus({ preventScroll: true });
}

function attemptTable(list) {
  if (!list.length) return el('p', { class: 'help', id: 'wh-no-attempts', text: 'No attempt yet.' });
  return el('table', { class: 'attempts' },
    el('caption', { text: `${list.length} attempt${list.length === 1 ? '' : 's'}` }),
    el('thead', {}, el('tr', {}, ['Time', 'Event id', 'Attempt', 'Status', 'Latency', 'Error', 'Response (excerpt)'].map((h) => el('th', { scope: 'col', text: h })))),
    el('tbody', {}, list.map((a) => el('tr', {},
      el('td', { text: when(a.at) }),
      el('td', {}, el('code', { text: a.event_id })),
      el('td', { class: 'num', text: a.attempt }),
      el('td', { class: `status ${a.status >= 200 && a.status < 300 ? 'ok' : 'bad'}`, text: a.status ?? 'no answer' }),
      el('td', { class: 'num', text: a.latency_ms === null || a.latency_ms === undefined ? '—' : `${a.latency_ms} ms` }),
      el('td', { text: a.error || '' }),
      el('td', { class: 'excerpt mono', title: a.response || '', text: (a.response || '').slice(0, 160) })))));
}

// ---- live tail -----------------------------------------------------------------------------

const TAIL_SHOWN = 200;
const TAIL_HELD = 1000;

function tailStatus(text) {
  $('tail-status').textContent = text;
}

function stopTail() {
  const t = work.tail;
  work.tail = null;
  if (t) {
    t.ctl.abort();
    if (t.retry) clearTimeout(t.retry);
  }
  $('tail-start').textContent = 'Start';
  const pause = $('tail-pause');
  pause.disabled = true;
  pause.setAttribute('aria-pressed', 'false');
  pause.textContent = 'Pause';
}

function matches(li) {
  const f = $('tail-filter').value.trim().toLowerCase();
  return !f || li.dataset.text.includes(f);
}

function showEvent(ev) {
  const list = $('tail-events');
  const json = JSON.stringify(ev.body, null, 2);
  const li = el('li', { 'data-type': ev.type },
    el('div', {}, el('strong', {}, el('code', { text: ev.type })), ' · ', when(ev.body && ev.body.time), ' · id ', el('code', { text: (ev.body && ev.body.id) || '' })),
    el('pre', {}, el('code', { text: json })));
  li.dataset.text = json.toLowerCase();
  li.hidden = !matches(li);
  list.prepend(li);
  while (list.children.length > TAIL_SHOWN) list.lastElementChild.remove();
}

function tailCounts() {
  const t = work.tail;
  if (!t) return;
  const base = t.connected ? 'Connected' : 'Connecting…';
  tailStatus(t.paused ? `Paused: ${t.held.length} new event${t.held.length === 1 ? '' : 's'} held.` : `${base}: ${t.seen} event${t.seen === 1 ? '' : 's'} received.`);
}

async function startTail() {
  if (work.tail) { stopTail(); tailStatus('Stopped.'); return; }
  const mine = session;
  if (!mine) return;
  const t = { ctl: new AbortController(), paused: false, held: [], lastId: null, seen: 0, connected: false, retry: null };
  work.tail = t;
  $('tail-start').textContent = 'Stop';
  $('tail-pause').disabled = false;
  await connectTail(t, mine);
}

async function connectTail(t, mine) {
  const type = $('tail-type').value;
  const url = `/v1/stream${type ? `?types=${encodeURIComponent(type)}` : ''}`;
  const headers = { Authorization: `Bearer ${mine.key}`, Accept: 'text/event-stream' };
  if (t.lastId) headers['Last-Event-ID'] = t.lastId;
  tailCounts();
  let resp;
  try {
    resp = await fetch(url, { headers, signal: t.ctl.signal, cache: 'no-store', credentials: 'omit' });
  } catch (e) {
    if (work.tail === t) retryTail(t, mine, `the gateway did not answer (${e.message})`);
    return;
  }
  if (resp.status === 401) { refused(mine); return; }
  if (!resp.ok) {
    let p = {};
    try { p = await resp.json(); } catch { /* not a problem body */ }
    if (work.tail === t) { stopTail(); tailStatus(`Not connected: ${problemText(new ApiError(resp.status, p))}`); }
    return;
  }
  t.connected = true;
  tailCounts();
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = '';
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += value.replace(/\r\n?/g, '\n');
      let end;
      while ((end = buf.indexOf('\n\n')) >= 0) {
        const block = buf.slice(0, end);
        buf = buf.slice(end + 2);
        frame(t, block);
      }
    }
  } catch {
    /* aborted or cut: handled below */
  }
  if (work.tail === t) retryTail(t, mine, 'the stream ended');
}

function retryTail(t, mine, why) {
  t.connected = false;
  tailStatus(`Reconnecting in 2 s: ${why}.`);
  t.retry = setTimeout(() => { if (work.tail === t && session === mine) connectTail(t, mine); }, 2000);
}

function frame(t, block) {
  let id = null;
  let type = 'message';
  const data = [];
  for (const line of block.split('\n')) {
    if (!line || line.startsWith(':')) continue;
    const i = line.indexOf(':');
    const field = i < 0 ? line : line.slice(0, i);
    let value = i < 0 ? '' : line.slice(i + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'id') id = value;
    else if (field === 'event') type = value;
    else if (field === 'data') data.push(value);
  }
  if (id !== null) t.lastId = id;
  if (!data.length) return;
  let body;
  try { body = JSON.parse(data.join('\n')); } catch { body = data.join('\n'); }
  t.seen += 1;
  const ev = { type, body };
  if (t.paused) {
    t.held.push(ev);
    if (t.held.length > TAIL_HELD) t.held.shift();
  } else {
    showEvent(ev);
  }
  tailCounts();
}

function togglePause() {
  const t = work.tail;
  if (!t) return;
  t.paused = !t.paused;
  const b = $('tail-pause');
  b.setAttribute('aria-pressed', String(t.paused));
  b.textContent = t.paused ? 'Resume' : 'Pause';
  if (!t.paused) {
    for (const ev of t.held) showEvent(ev);
    t.held = [];
  }
  tailCounts();
}

function applyFilter() {
  for (const li of $('tail-events').children) li.hidden = !matches(li);
}

// ---- keys (admin) --------------------------------------------------------------------------

function patterns(text) {
  return text.split(',').map((s) => s.trim()).filter(Boolean);
}

/** The sources of the form, one per line (never split on commas: a source may hold one),
 * each with its line number for messages. */
function sourceLines(text) {
  return text.split(/\r?\n/).map((s, i) => ({ source: s.trim(), line: i + 1 })).filter((s) => s.source);
}

async function createKey(ev) {
  ev.preventDefault();
  const err = $('key-create-error');
  err.textContent = '';
  const sources = sourceLines($('key-sources').value);
  const body = {
    name: $('key-name').value,
    subscribe: patterns($('key-subscribe').value),
    publish: patterns($('key-publish').value),
    sources: sources.map((s) => s.source),
    admin: $('key-admin').checked,
  };
  const exp = $('key-expires').value;
  if (exp) body.expires_at = new Date(exp).toISOString();
  try {
    const made = await api('POST', '/v1/keys', body);
    for (const id of ['key-name', 'key-subscribe', 'key-publish', 'key-sources', 'key-expires']) $(id).value = '';
    $('key-admin').checked = false;
    await loadKeys();
    const warnings = (made.warnings || []).length ? ` Check its scopes: ${made.warnings.join('; ')}.` : '';
    secretBox($('key-new'), `Key "${made.name}" created:`, made.key, `Give it to its holder through a safe channel; the gateway keeps only a hash.${warnings}`);
  } catch (e) {
    const detail = (e.problem && e.problem.detail) || '';
    // `invalid_positions` index the list the detail names: a scope list, or the sources
    // (named by their line in the form: a bad one may be long or hold invisible characters).
    const names = detail.includes('`publish`') ? body.publish
      : detail.includes('source pattern') ? sources.map((s) => `line ${s.line} of the sources`)
        : body.subscribe;
    err.textContent = `The key was not created. ${problemText(e, names)}`;
  }
}

async function loadKeys() {
  const keys = await api('GET', '/v1/keys');
  const list = clear($('keys-list'));
  list.append(el('table', { class: 'keys' },
    el('caption', { text: `${keys.length} key${keys.length === 1 ? '' : 's'}` }),
    el('thead', {}, el('tr', {}, ['Name', 'Prefix', 'Subscribe', 'Publish', 'Sources', 'Admin', 'Created', 'Expires', 'State', ''].map((h) => el('th', { scope: 'col', text: h })))),
    el('tbody', {}, keys.map((k) => {
      const revoked = Boolean(k.revoked_at);
      const expired = k.expires_at && new Date(k.expires_at) <= new Date();
      const cell = el('td', {});
      if (!revoked) {
        const confirm = el('span', { hidden: true },
          el('button', { type: 'button', class: 'danger', text: 'Revoke now', 'aria-label': `Revoke key ${k.name} now`, onclick: async () => {
            try {
              await api('DELETE', `/v1/keys/${encodeURIComponent(k.id)}`);
              notice(`Key ${k.prefix} revoked: every request with it is refused from now on.`);
              await loadKeys();
            } catch (e) { notice(`Not revoked: ${problemText(e)}`); }
          } }), ' ',
          el('button', { type: 'button', class: 'secondary', text: 'Cancel', onclick: () => { confirm.hidden = true; ask.hidden = false; ask.focus(); } }));
        const ask = el('button', { type: 'button', class: 'secondary', text: 'Revoke…', 'aria-label': `Revoke key ${k.name}`, onclick: () => { ask.hidden = true; confirm.hidden = false; confirm.querySelector('button').focus(); } });
        cell.append(ask, confirm);
      }
      return el('tr', { 'data-key': k.id },
        el('td', { text: k.name }),
        el('td', {}, el('code', { text: k.prefix })),
        el('td', {}, k.subscribe.map((p) => el('span', { class: 'pill', text: p }))),
        el('td', {}, k.publish.map((p) => el('span', { class: 'pill', text: p }))),
        el('td', { class: 'sources' }, (k.sources || []).map((s) => el('code', { class: 'pill source', text: s, title: s === '*' ? 'any source' : null }))),
        el('td', { text: k.admin ? 'yes' : 'no' }),
        el('td', { text: when(k.created_at) }),
        el('td', { text: k.expires_at ? when(k.expires_at) : 'never' }),
        el('td', { class: revoked || expired ? 'bad' : 'ok', text: revoked ? `revoked ${when(k.revoked_at)}` : expired ? 'expired' : 'active' }),
        cell);
    }))));
}

// ---- delivery overview (admin) -------------------------------------------------------------

async function loadDeliveries() {
  const box = clear($('deliveries'));
  box.append(el('p', { class: 'status', text: 'Loading…' }));
  const hooks = await api('GET', '/v1/webhooks');
  const shown = hooks.slice(0, 200);
  const logs = new Array(shown.length);
  let next = 0;
  async function worker() {
    while (next < shown.length) {
      const i = next++;
      logs[i] = await api('GET', `/v1/webhooks/${encodeURIComponent(shown[i].id)}/attempts`).catch(() => null);
    }
  }
  await Promise.all([worker(), worker(), worker(), worker()]);
  const disabled = hooks.filter((w) => !w.enabled).length;
  const failing = hooks.filter((w) => w.enabled && w.failing_since).length;
  clear(box).append(
    el('p', { id: 'deliveries-summary', text: `${hooks.length} endpoint${hooks.length === 1 ? '' : 's'}: ${disabled} disabled, ${failing} failing.${hooks.length > shown.length ? ` The first ${shown.length} are listed.` : ''}` }),
    el('table', {},
      el('caption', { text: 'Endpoints' }),
      el('thead', {}, el('tr', {}, ['Endpoint', 'Types', 'State', 'Last attempt', 'Delivered / attempts logged', 'Median latency'].map((h) => el('th', { scope: 'col', text: h })))),
      el('tbody', {}, shown.map((w, i) => {
        const log = logs[i];
        const last = log && log[0];
        const ok = log ? log.filter((a) => a.status >= 200 && a.status < 300).length : 0;
        const lat = log ? log.map((a) => a.latency_ms).filter((n) => typeof n === 'number').sort((a, b) => a - b) : [];
        return el('tr', {},
          el('td', {}, el('code', { text: w.url })),
          el('td', {}, w.event_types.map((t) => el('span', { class: 'pill', text: t }))),
          el('td', {}, state(w)),
          el('td', { text: last ? `${when(last.at)}: ${last.status ?? last.error ?? 'no answer'}` : log ? 'none yet' : 'could not load' }),
          el('td', { class: 'num', text: log ? `${ok} / ${log.length}` : '—' }),
          el('td', { class: 'num', text: lat.length ? `${lat[Math.floor(lat.length / 2)]} ms` : '—' }));
      }))));
}

// ---- wiring --------------------------------------------------------------------------------

function wire() {
  $('signin-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const key = $('key').value.trim();
    if (!key) { $('signin-error').textContent = 'Type or paste an API key.'; return; }
    signIn(key);
  });
  $('signout').addEventListener('click', () => signOut());
  for (const b of document.querySelectorAll('nav button')) b.addEventListener('click', () => show(b.dataset.view));
  $('wh-create').addEventListener('submit', createWebhook);
  $('key-create').addEventListener('submit', createKey);
  $('tail-form').addEventListener('submit', (ev) => ev.preventDefault());
  $('tail-start').addEventListener('click', startTail);
  $('tail-pause').addEventListener('click', togglePause);
  $('tail-clear').addEventListener('click', () => clear($('tail-events')));
  $('tail-filter').addEventListener('input', applyFilter);
  $('tail-type').addEventListener('change', () => {
    if (work.tail) { stopTail(); startTail(); }
  });
  $('deliveries-refresh').addEventListener('click', () => loadDeliveries().catch((e) => notice(problemText(e))));
  document.documentElement.dataset.ready = 'true';
  $('key').focus();
}

wire();
