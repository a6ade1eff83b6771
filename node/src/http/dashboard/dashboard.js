// The dashboard: daemons and jobs polled from the API, each running job followed live over its
// events stream (NDJSON through fetch, which, unlike EventSource, can carry the API's token).
'use strict';

const POLL_MS = 2000;
// A browser opens at most six connections to one host; each followed job holds one, and the
// polls and the run form need the rest.
const MAX_FOLLOWED = 3;

const token = (() => {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) sessionStorage.setItem('p2pmr-token', decodeURIComponent(m[1]));
  return sessionStorage.getItem('p2pmr-token');
})();

const jobs = new Map(); // job id -> state built from its summary and its events
const followed = new Set();
// Milliseconds from a task_finished event's recording at its coordinator to the page
// showing it (read by the browser check and the benchmark).
window.p2pmrLatencies = [];

function headers(extra) {
  const h = Object.assign({}, extra);
  if (token) h.Authorization = 'Bearer ' + token;
  return h;
}

async function call(path, body) {
  const r = await fetch('/api/v0/' + path, {
    method: 'POST',
    headers: headers(body ? { 'Content-Type': 'application/json' } : {}),
    body: body ? JSON.stringify(body) : undefined,
  });
  const v = await r.json().catch(() => ({ Message: r.statusText }));
  if (!r.ok) throw new Error(v.Message || r.statusText);
  return v;
}

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === 'class') e.className = v;
    else if (k === 'style') e.style.cssText = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : String(c));
  return e;
}

function bytes(n) {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + ' ' + units[i];
}

const short = (id) => id.length > 16 ? id.slice(0, 6) + '…' + id.slice(-6) : id;

// Daemons

async function pollDaemons() {
  const { Daemons } = await call('mr/daemons');
  const rows = Daemons.map((d) => {
    const state = d.Up ? 'up' : 'down';
    const tr = el('tr', { class: 'daemon', 'data-peer': d.ID, 'data-up': String(d.Up) },
      el('td', { class: 'mono', title: d.ID }, short(d.ID), d.Self ? ' (this one)' : ''),
      el('td', {}, el('span', { class: 'badge ' + state, title: d.Error || '' }, state)),
      el('td', { class: 'num' }, d.Slots),
      el('td', { class: 'num' }, d.Running),
      el('td', { class: 'num' }, d.Blocks),
      el('td', { class: 'num' }, bytes(d.Bytes)),
      el('td', { class: 'num', title: bytes(d.MemoBytes || 0) + ' of task output' },
        d.MemoTasks || 0),
      el('td', { class: 'mono' }, (d.Addresses || []).join(' ')));
    return tr;
  });
  document.getElementById('daemons').replaceChildren(...rows);
  // Peers a daemon's --allow-jobs refused, newest first.
  const refusals = Daemons.flatMap((d) => (d.Refusals || []).map((r) => ({ ...r, by: d.ID })))
    .sort((a, b) => b.At - a.At).slice(0, 10);
  document.getElementById('refusals').hidden = refusals.length === 0;
  document.getElementById('refusal-list').replaceChildren(...refusals.map((r) =>
    el('li', { class: 'refusal', 'data-peer': r.Peer },
      new Date(r.At).toLocaleTimeString() + ' ', el('span', { class: 'mono' }, short(r.Peer)),
      ' may not ' + r.What + ' jobs (refused by ', el('span', { class: 'mono' }, short(r.by)),
      ')')));
  const me = Daemons.find((d) => d.Self);
  if (me) document.getElementById('me').textContent = me.ID;
}

// Jobs

function jobState(id) {
  if (!jobs.has(id)) {
    jobs.set(id, {
      id, state: 'running', maps: [0, 0], reduces: [0, 0], elapsed: 0, inputBytes: 0,
      counters: null, output: null, reason: null, coordinator: '', first: null, last: null,
      tasks: new Map(), finished: new Set(), mismatches: [], retries: 0, backups: 0, splits: 0, events: 0,
      fetched: null, reused: null,
      seen: Date.now(),
    });
  }
  return jobs.get(id);
}

function fromSummary(s) {
  const j = jobState(s.job);
  // A job whose events are read is drawn from them; the polled summary covers the rest.
  if (j.events === 0 || j.unfollowable) {
    j.state = s.state === 'succeeded' ? 'completed' : s.state;
    j.output = s.output || j.output;
    j.reason = s.reason || j.reason;
    j.maps = s.maps;
    j.reduces = s.reduces;
    j.elapsed = s.elapsed_ms;
    j.counters = s.counters;
  }
  j.coordinator = s.coordinator || j.coordinator;
  if (j.events === 0 && !j.unfollowable && !followed.has(j.id) && followed.size < MAX_FOLLOWED) {
    follow(j.id);
  }
}

async function pollJobs() {
  const { Jobs } = await call('mr/jobs');
  for (const s of Jobs) fromSummary(s);
  render();
}

function apply(j, e) {
  j.events++;
  if (e.at) {
    j.first = j.first ?? e.at;
    j.last = e.at;
  }
  const key = e.kind + ' ' + e.task;
  switch (e.event) {
    case 'accepted': j.coordinator = e.coordinator; break;
    case 'planned':
      j.maps = [0, e.maps]; j.reduces = [0, e.reduces]; j.inputBytes = e.input_bytes; break;
    case 'reused': {
      j.maps[0] += e.maps; j.reduces[0] += e.reduces;
      const r = j.reused || { maps: 0, reduces: 0, bytes: 0, from: e.from };
      r.maps += e.maps; r.reduces += e.reduces; r.bytes += e.input_bytes || 0;
      j.reused = r;
      break;
    }
    case 'task_started': {
      const t = j.tasks.get(key) || { kind: e.kind, task: e.task, runs: [] };
      t.runs.push({ peer: e.peer, start: e.at, end: null, attempt: e.attempt, backup: false });
      j.tasks.set(key, t);
      break;
    }
    case 'backup': {
      j.backups++;
      const t = j.tasks.get(key) || { kind: e.kind, task: e.task, runs: [] };
      t.runs.push({ peer: e.peer, start: e.at, end: null, backup: true });
      j.tasks.set(key, t);
      break;
    }
    case 'split':
      // The rest of a task cut in two is one more map task to finish.
      j.maps[1]++; j.splits++; break;
    case 'verify_mismatch':
      j.mismatches.push(e.kind + ' task ' + e.task + ': ' + e.dissent.map(short).join(', ') +
        ' disagreed with ' + e.agreed.map(short).join(', ') + ' and ' +
        (e.dissent.length === 1 ? 'was' : 'were') + ' left out');
      break;
    case 'task_finished': {
      // Verification and re-runs finish a task more than once: count it once.
      if (!j.finished.has(key)) {
        j.finished.add(key);
        if (e.kind === 'map') j.maps[0]++; else j.reduces[0]++;
      }
      const run = openRun(j, key, e.peer);
      if (run) { run.end = e.at; run.ok = true; }
      break;
    }
    case 'task_failed': {
      if (e.retry) j.retries++;
      const run = openRun(j, key, e.peer);
      if (run) { run.end = e.at; run.lost = true; }
      break;
    }
    case 'completed':
      j.state = 'completed'; j.output = e.output; j.counters = e.counters;
      j.elapsed = e.elapsed_ms; break;
    case 'failed': j.state = 'failed'; j.reason = e.reason; break;
    case 'cancelled': j.state = 'cancelled'; break;
    case 'error': j.reason = e.reason; break;
    case 'fetching': j.fetched = e; break;
  }
}

function openRun(j, key, peer) {
  const t = j.tasks.get(key);
  if (!t) return null;
  return t.runs.find((r) => r.peer === peer && r.end === null) || t.runs.find((r) => r.end === null);
}

async function follow(id) {
  followed.add(id);
  const j = jobState(id);
  const opened = Date.now();
  try {
    const r = await fetch('/api/v0/mr/events?arg=' + encodeURIComponent(id), {
      method: 'POST', headers: headers({ Accept: 'application/x-ndjson' }),
    });
    if (!r.ok) throw new Error((await r.json().catch(() => ({}))).Message || r.statusText);
    const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffered = '';
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffered += value;
      const lines = buffered.split('\n');
      buffered = lines.pop();
      const finished = [];
      for (const line of lines) {
        if (!line.trim()) continue;
        const e = JSON.parse(line);
        apply(j, e);
        // Events recorded before the stream was opened are history, not latency.
        if (e.event === 'task_finished' && e.at >= opened) finished.push(e.at);
      }
      render();
      if (finished.length) {
        // Counted once the browser has laid the update out and is about to paint it.
        requestAnimationFrame(() => {
          const now = Date.now();
          for (const at of finished) window.p2pmrLatencies.push(now - at);
        });
      }
    }
  } catch (err) {
    j.unfollowable = true;
    j.reason = 'following its events failed: ' + err.message;
    render();
  } finally {
    followed.delete(id);
  }
}

function bar(kind, done, total) {
  const pct = total ? Math.min(100, (100 * done) / total) : 0;
  return [
    el('span', { class: 'stats' }, kind),
    el('div', { class: 'bar ' + kind }, el('div', { style: 'width:' + pct.toFixed(1) + '%' })),
    el('span', { class: 'stats num', 'data-progress': kind }, done + ' / ' + total),
  ];
}

function timeline(j) {
  if (!j.first) return el('div');
  const end = j.state === 'running' ? Math.max(j.last, Date.now()) : j.last;
  const span = Math.max(1, end - j.first);
  const lanes = new Map();
  for (const t of j.tasks.values()) {
    for (const r of t.runs) {
      if (!lanes.has(r.peer)) lanes.set(r.peer, []);
      const left = (100 * (r.start - j.first)) / span;
      const width = (100 * ((r.end ?? end) - r.start)) / span;
      const cls = ['task', t.kind, r.end === null ? 'open' : '', r.lost ? 'lost' : '',
        r.backup ? 'backup' : ''].join(' ');
      const label = t.kind + ' ' + t.task + (r.attempt > 1 ? ' attempt ' + r.attempt : '') +
        (r.backup ? ' (backup)' : '') + (r.lost ? ' (failed)' : '') +
        (r.end ? ', ' + (r.end - r.start) + ' ms' : ', running');
      lanes.get(r.peer).push(el('div', {
        class: cls, title: label, style: `left:${left.toFixed(2)}%;width:${width.toFixed(2)}%`,
      }));
    }
  }
  const rows = [...lanes.entries()].sort().map(([peer, tasks]) =>
    el('div', { class: 'lane' }, el('span', { class: 'who', title: peer }, short(peer)),
      el('div', { class: 'track' }, ...tasks)));
  return el('div', { class: 'timeline' }, ...rows);
}

function counters(c) {
  if (!c) return el('span');
  const rows = Object.entries(c).map(([k, v]) =>
    el('tr', {}, el('td', {}, k.replace(/_/g, ' ')), el('td', { class: 'num' }, v)));
  return el('details', {}, el('summary', {}, 'counters'), el('table', {}, ...rows));
}

function output(j) {
  if (!j.output) return el('span');
  const parts = [];
  for (let p = 0; p < Math.max(1, j.reduces[1]); p++) {
    const name = 'part-' + String(p).padStart(5, '0');
    parts.push(' ', el('a', { href: '/ipfs/' + j.output + '/' + name, download: name }, name));
  }
  return el('div', {},
    'output ', el('a', { class: 'mono output', href: '/ipfs/' + j.output + '?format=car' },
      j.output), ' ·', ...parts);
}

function card(j) {
  const elapsed = j.state === 'running' && j.first ? Date.now() - j.first : j.elapsed;
  const done = j.counters ? j.counters.input_bytes : 0;
  const mbs = elapsed > 0 && done ? (done / 1048576 / (elapsed / 1000)).toFixed(1) : null;
  return el('div', { class: 'job', 'data-job': j.id, 'data-state': j.state },
    el('div', { class: 'head' },
      el('span', { class: 'badge state ' + j.state }, j.state),
      el('span', { class: 'mono', title: j.id }, j.id),
      el('span', { class: 'stats' }, 'coordinator ' + short(j.coordinator))),
    el('div', { class: 'bars' },
      ...bar('map', j.maps[0], j.maps[1]), ...bar('reduce', j.reduces[0], j.reduces[1])),
    el('div', { class: 'stats' },
      (elapsed / 1000).toFixed(1) + ' s' + (mbs ? ' · ' + mbs + ' MB/s' : '') +
      (j.inputBytes ? ' · ' + bytes(j.inputBytes) + ' in' : '') +
      ' · ' + j.retries + ' retries · ' + j.backups + ' backups' +
      (j.splits ? ' · ' + j.splits + ' cut in two' : '')),
    j.fetched ? el('div', { class: 'stats fetch' }, (j.fetched.done ? 'fetched ' : 'fetching ') +
      j.fetched.blocks + ' blocks, ' + bytes(j.fetched.bytes) + ' (' + j.fetched.from_ipfs +
      ' from IPFS peers) · ' + j.fetched.retries + ' retries') : '',
    j.reused ? el('div', { class: 'stats reused' }, 'reused ' + j.reused.maps + ' map and ' +
      j.reused.reduces + ' reduce tasks' + (j.reused.bytes ? ' over ' + bytes(j.reused.bytes) : '') +
      (j.reused.from === 'memo' ? ' the daemons remember' : ' from the previous coordinator')) : '',
    j.reason ? el('div', { class: 'error' }, j.reason) : '',
    ...j.mismatches.map((m) => el('div', { class: 'error mismatch' }, m)),
    output(j),
    timeline(j),
    counters(j.counters));
}

function render() {
  const list = [...jobs.values()].sort((a, b) => (b.first ?? b.seen) - (a.first ?? a.seen));
  const box = document.getElementById('jobs');
  if (list.length) box.replaceChildren(...list.map(card));
}

// Running a job

document.getElementById('run').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const f = ev.target;
  const out = document.getElementById('run-result');
  const args = {};
  for (const line of f.args.value.split('\n')) {
    const i = line.indexOf('=');
    if (i > 0) args[line.slice(0, i).trim()] = line.slice(i + 1).trim();
  }
  out.className = '';
  out.textContent = 'submitting…';
  try {
    const r = await call('mr/run', {
      job: f.job.value, inputs: [f.input.value.trim()], reducers: Number(f.reducers.value), args,
    });
    out.textContent = 'job ' + r.Job;
    const j = jobState(r.Job);
    j.coordinator = r.Coordinator;
    j.seen = Date.now();
    if (!followed.has(r.Job)) follow(r.Job);
    render();
  } catch (err) {
    out.className = 'error';
    out.textContent = err.message;
  }
});

// The loop

async function tick() {
  const live = document.getElementById('live');
  try {
    await Promise.all([pollDaemons(), pollJobs()]);
    live.textContent = 'live · ' + new Date().toLocaleTimeString();
  } catch (err) {
    live.textContent = 'API unreachable: ' + err.message;
  }
  setTimeout(tick, POLL_MS);
}
tick();
setInterval(() => { if ([...jobs.values()].some((j) => j.state === 'running')) render(); }, 500);
