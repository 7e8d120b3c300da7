// The page: checks for WebGPU, opens the adapter through the wasm module, runs the form's
// problem and shows the report. `document.body.dataset.state` tells tests where it is:
// loading | no-webgpu | no-adapter | no-wasm | ready | running | done | error.

import init, { Demo } from './pkg/flashattn_web_demo.js';
import { drawHeatmap, drawColourbar } from './heatmap.js';

const $ = (id) => document.getElementById(id);
const form = $('form');
const runButton = $('run');

const PRESETS = {
  causal: { seqlen: 256, heads: 4, head_dim: 64, causal: true, alibi: false, window_left: -1, window_right: -1, softcap: 0 },
  window: { seqlen: 256, heads: 4, head_dim: 64, causal: false, alibi: false, window_left: 48, window_right: 16, softcap: 0 },
  alibi: { seqlen: 256, heads: 4, head_dim: 64, causal: true, alibi: true, window_left: -1, window_right: -1, softcap: 0 },
  softcap: { seqlen: 256, heads: 4, head_dim: 64, causal: false, alibi: false, window_left: -1, window_right: -1, softcap: 1 },
  large: { seqlen: 4096, heads: 8, head_dim: 64, causal: true, alibi: false, window_left: -1, window_right: -1, softcap: 0 },
};

function setState(state, banner, kind = 'info') {
  document.body.dataset.state = state;
  if (banner !== undefined) {
    const el = $('support');
    el.textContent = banner;
    el.className = `banner ${kind}`;
  }
}

function message(text, kind = '') {
  const el = $('message');
  el.textContent = text;
  el.className = kind;
}

function readForm() {
  const f = new FormData(form);
  const int = (name) => Number.parseInt(f.get(name), 10);
  return {
    seqlen: int('seqlen'),
    heads: int('heads'),
    head_dim: int('head_dim'),
    dtype: f.get('dtype'),
    causal: f.get('causal') === 'on',
    alibi: f.get('alibi') === 'on',
    window_left: int('window_left'),
    window_right: int('window_right'),
    softcap: Number.parseFloat(f.get('softcap')),
    heatmap_head: int('heatmap_head'),
    iters: int('iters'),
    seed: int('seed'),
    check: f.get('check'),
    naive: f.get('naive') === 'on',
    gradients: f.get('gradients') === 'on',
  };
}

// Writes `values` into the form (used by presets and by tests through `window.flashattn`).
function setForm(values) {
  for (const [name, value] of Object.entries(values)) {
    const el = form.elements.namedItem(name);
    if (!el) throw new Error(`no form field ${name}`);
    if (el.type === 'checkbox') el.checked = Boolean(value);
    else el.value = String(value);
  }
}

const bytes = (n) => {
  if (n === null || n === undefined) return 'not measured';
  const units = ['B', 'KiB', 'MiB', 'GiB'];
  let u = 0;
  while (n >= 1024 && u < units.length - 1) { n /= 1024; u++; }
  return `${n.toFixed(u === 0 ? 0 : 1)} ${units[u]}`;
};
const ms = (t) => (t === null || t === undefined ? '—' : `${t.toFixed(3)} ms`);
const rate = (tf) => {
  if (tf === null || tf === undefined) return '—';
  if (tf >= 0.1) return `${tf.toPrecision(3)} TFLOP/s`;
  if (tf >= 1e-4) return `${(tf * 1e3).toPrecision(3)} GFLOP/s`;
  return `${(tf * 1e6).toPrecision(3)} MFLOP/s`;
};
const sci = (x) => (x === null || x === undefined ? '—' : Number(x).toExponential(2));

function showReport(r) {
  const t = r.timing;
  const m = r.memory;
  const c = r.check;
  const rows = [];
  rows.push(['problem', `${r.spec} (${(r.flops / 1e9).toFixed(3)} GFLOP)`]);
  if (c.skipped) {
    rows.push(['check vs f64 reference', `skipped: ${c.skipped}`, 'skip']);
  } else {
    const verdict = c.passed ? 'pass' : 'FAIL';
    rows.push(['check vs f64 reference',
      `${verdict}: relative L2 error ${sci(c.rel_l2)} (tolerance ${sci(c.tolerance)}), ` +
      `LSE max error ${sci(c.lse_max_abs)} (bound ${sci(c.lse_bound)}); reference took ${ms(c.reference_ms)}`,
      c.passed ? 'pass' : 'fail']);
  }
  const g = r.gradients;
  if (g.skipped) {
    rows.push(['gradients vs f64 reference backward', `skipped: ${g.skipped}`, 'skip']);
  } else {
    rows.push(['gradients vs f64 reference backward',
      `${g.passed ? 'pass' : 'FAIL'}: relative L2 error dq ${sci(g.dq_rel_l2)}, dk ${sci(g.dk_rel_l2)}, ` +
      `dv ${sci(g.dv_rel_l2)} (tolerance ${sci(g.tolerance)}); backward took ${ms(g.backward_ms)} ` +
      `(upload, run, readback), the reference ${ms(g.reference_ms)}`,
      g.passed ? 'pass' : 'fail']);
  }
  rows.push(['rows of P sum to 1', `max |Σp − 1| = ${sci(r.heatmap.row_sum_max_err)} over ${r.heatmap.rows} sampled rows`,
    r.heatmap.row_sum_max_err < 1e-2 ? 'pass' : 'fail']);
  rows.push(['flash time', `${ms(t.flash_ms)} median of ${t.iters} (${t.timer})`]);
  rows.push(['flash throughput', rate(t.flash_tflops)]);
  if (t.naive_error) rows.push(['naive attention', `not timed: ${t.naive_error}`]);
  else {
    const speedup = t.naive_ms && t.flash_ms ? ` — flash is ${(t.naive_ms / t.flash_ms).toFixed(2)}× faster` : '';
    rows.push(['naive time', `${ms(t.naive_ms)}, ${rate(t.naive_tflops)}${speedup}`]);
  }
  rows.push(['first forward (upload, shader compile, run, readback)', ms(t.first_forward_ms)]);
  rows.push(['inputs / outputs', `${bytes(m.inputs_bytes)} / ${bytes(m.outputs_bytes)}`]);
  rows.push(['extra device memory, flash', `${bytes(m.flash_extra_bytes)} (measured: buffers allocated beyond inputs and outputs)`]);
  rows.push(['extra device memory, naive', m.naive_extra_bytes === null ? 'not measured'
    : `${bytes(m.naive_extra_bytes)} (measured)`]);
  rows.push(['score matrix S = b·h·sq·sk·4 bytes', `${bytes(m.score_matrix_bytes)}: what naive attention materialises, flash never does`]);
  const body = $('report').tBodies[0];
  body.replaceChildren(...rows.map(([k, v, cls]) => {
    const tr = document.createElement('tr');
    const th = document.createElement('th');
    th.textContent = k;
    const td = document.createElement('td');
    td.textContent = v;
    if (cls) td.className = cls;
    tr.append(th, td);
    return tr;
  }));
}

function showHeatmap(r) {
  const map = r.heatmap;
  const canvas = $('heatmap');
  const range = drawHeatmap(canvas, map);
  Object.assign(canvas.dataset, {
    drawn: 'true', rows: map.rows, cols: map.cols, maskedCells: map.masked_cells,
  });
  $('legend-lo').textContent = `10^${range.lo.toFixed(1)}`;
  $('legend-hi').textContent = `10^${range.hi.toFixed(1)}`;
  const sampled = map.rows < r.seqlen ? `, ${map.rows} of ${r.seqlen} query rows (${map.first_row}…${map.last_row})` : '';
  const binned = map.cols < r.seqlen ? `, keys binned ${map.cols} wide (mean weight per bin)` : '';
  $('caption').textContent = `Head ${map.head} of ${r.heads}${sampled}${binned}. Rows are queries, ` +
    `columns keys; colour is log10 of p_ij = exp(s_ij − lse_i) from the kernel's LSE; ` +
    `grey: masked (${map.masked_cells} cells).`;
}

async function run(demo) {
  const config = readForm();
  runButton.disabled = true;
  setState('running');
  message('Running…');
  try {
    // Give the browser a frame to paint "Running…" before the wasm work starts.
    await new Promise((resolve) => requestAnimationFrame(() => resolve()));
    const report = await demo.run(config);
    window.flashattnReport = report;
    showReport(report);
    showHeatmap(report);
    const failed = report.check.passed === false || report.gradients.passed === false;
    message(failed ? 'The result does NOT match the reference.' : 'Done.', failed ? 'fail' : 'pass');
    setState('done');
  } catch (e) {
    window.flashattnReport = null;
    message(`Error: ${e}`, 'fail');
    setState('error');
  } finally {
    runButton.disabled = false;
  }
}

// The browser's own words for the adapter (wgpu's AdapterInfo has no names on the web).
async function browserAdapterName() {
  try {
    const a = await navigator.gpu.requestAdapter({ powerPreference: 'high-performance' });
    const i = a && (a.info || (a.requestAdapterInfo ? await a.requestAdapterInfo() : null));
    if (!i) return '';
    return [i.vendor, i.architecture, i.device, i.description].filter((x) => x).join(' ');
  } catch {
    return '';
  }
}

function showAdapter(info) {
  const entries = [
    ['adapter', `${info.browser_name || 'unnamed adapter'} — wgpu: ${info.description}`],
    ['dtypes', info.dtypes.join(', ') + (info.shader_f16 ? '' : ' (no shader-f16: f16 is off)')],
    ['timer', info.timestamps ? 'device timestamps' : 'host clock (no timestamp-query)'],
    ['subgroups', info.subgroup_size ? `width ${info.subgroup_size}` : 'not used'],
  ];
  $('adapter').replaceChildren(...entries.flatMap(([k, v]) => {
    const dt = document.createElement('dt');
    dt.textContent = k;
    const dd = document.createElement('dd');
    dd.textContent = v;
    return [dt, dd];
  }));
  for (const opt of form.elements.namedItem('dtype').options) {
    opt.disabled = !info.dtypes.includes(opt.value);
  }
}

async function main() {
  drawColourbar($('colorbar'));
  for (const b of document.querySelectorAll('[data-preset]')) {
    b.addEventListener('click', () => setForm(PRESETS[b.dataset.preset]));
  }
  if (!('gpu' in navigator)) {
    const why = window.isSecureContext ? '' : ' WebGPU needs a secure context: open the page from https:// or http://localhost.';
    setState('no-webgpu',
      'WebGPU is not available in this browser (navigator.gpu is missing), so this demo cannot run.' + why +
      ' Use a browser with WebGPU on: Chrome or Edge 113+, Safari 26+, Firefox 141+ on Windows;' +
      ' on Linux, Chrome needs --enable-unsafe-webgpu --enable-features=Vulkan.', 'error');
    return;
  }
  try {
    await init();
  } catch (e) {
    setState('no-wasm', `Could not load the wasm module (run web-demo/build.sh first): ${e}`, 'error');
    return;
  }
  let demo;
  try {
    demo = await Demo.create();
  } catch (e) {
    setState('no-adapter', `WebGPU is present but no usable adapter was found: ${e}`, 'error');
    return;
  }
  const info = demo.adapter();
  info.browser_name = await browserAdapterName();
  window.flashattnAdapter = info;
  showAdapter(info);
  form.addEventListener('submit', (ev) => { ev.preventDefault(); run(demo); });
  // For tests and scripting: set fields, then run, resolving with the report (or null).
  window.flashattn = {
    setForm,
    run: async (values = {}) => { setForm(values); await run(demo); return window.flashattnReport; },
  };
  runButton.disabled = false;
  setState('ready', `WebGPU ready on ${info.browser_name || info.description}.`, 'ok');
}

main();
