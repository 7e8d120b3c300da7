// End-to-end test of the demo page in headless Chromium on SwiftShader's WebGPU adapter.
// Usage: node tests/e2e.mjs http://127.0.0.1:PORT/   (web-demo/test.sh serves the page).
// Env: CHROMIUM (default /usr/bin/chromium), SCREENSHOTS (default web-demo/screenshots).
// Prints one line per case and `e2e: N passed, M failed`; exits 1 on any failure.

import { chromium } from 'playwright-core';
import { mkdirSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const url = process.argv[2];
if (!url) {
  console.error('usage: node tests/e2e.mjs URL');
  process.exit(2);
}
const here = dirname(fileURLToPath(import.meta.url));
const shots = process.env.SCREENSHOTS || join(here, '..', 'screenshots');
mkdirSync(shots, { recursive: true });

// Headless flags as this kind of machine needs them (closed network, root, no GPU), and
// WebGPU on SwiftShader, Chromium's CPU Vulkan implementation that ships with it.
const BASE_ARGS = [
  '--no-sandbox', '--disable-quic', '--no-first-run', '--disable-background-networking',
  '--disable-component-update', '--disable-sync',
];
const WEBGPU_ARGS = [
  '--enable-unsafe-webgpu', '--enable-features=Vulkan', '--use-webgpu-adapter=swiftshader',
  '--use-angle=swiftshader',
];
// SwiftShader runs the kernels on the CPU: generous, but a hang still fails.
const RUN_TIMEOUT_MS = 240_000;

function assert(cond, what) {
  if (!cond) throw new Error(what);
}

async function launch(args) {
  // playwright makes a fresh, empty --user-data-dir for every launch.
  return chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: [...BASE_ARGS, ...args],
  });
}

async function openPage(browser, init) {
  const page = await browser.newPage({ viewport: { width: 1280, height: 1000 } });
  const logs = [];
  page.on('console', (m) => logs.push(`${m.type()}: ${m.text()}`));
  page.on('pageerror', (e) => logs.push(`pageerror: ${e.message}`));
  if (init) await page.addInitScript(init);
  await page.goto(url);
  await page.waitForFunction(() => document.body.dataset.state !== 'loading', null, { timeout: 60_000 });
  return { page, logs };
}

// Luminance statistics and masked-colour count of the heatmap canvas, read back from its pixels.
async function canvasStats(page) {
  return page.evaluate(() => {
    const c = document.getElementById('heatmap');
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    let sum = 0;
    let sq = 0;
    let masked = 0;
    const n = c.width * c.height;
    for (let i = 0; i < d.length; i += 4) {
      const y = 0.2126 * d[i] + 0.7152 * d[i + 1] + 0.0722 * d[i + 2];
      sum += y;
      sq += y * y;
      if (d[i] === 52 && d[i + 1] === 52 && d[i + 2] === 58) masked++;
    }
    const mean = sum / n;
    const px = (x, y) => Array.from(d.slice(4 * (y * c.width + x), 4 * (y * c.width + x) + 3));
    return {
      width: c.width, height: c.height, variance: sq / n - mean * mean, masked,
      drawn: c.dataset.drawn, topRight: px(c.width - 1, 0), bottomLeft: px(0, c.height - 1),
    };
  });
}

// Visible (query, key) pairs of one head: the page's mask semantics re-derived here.
function visiblePairs(n, causal, left, right) {
  let count = 0;
  for (let i = 0; i < n; i++) {
    for (let j = 0; j < n; j++) {
      const ok = (!causal || j <= i) && (left < 0 || j >= i - left) && (right < 0 || j <= i + right);
      if (ok) count++;
    }
  }
  return count;
}

async function runCase(page, config) {
  const report = await page.evaluate((cfg) => window.flashattn.run(cfg), config);
  const state = await page.evaluate(() => document.body.dataset.state);
  const msg = await page.textContent('#message');
  assert(state === 'done' && report, `run ended in state ${state}: ${msg}`);
  return report;
}

function checkReport(r, config) {
  const c = r.check;
  assert(!c.skipped, `reference check skipped: ${c.skipped}`);
  assert(Number.isFinite(c.rel_l2) && c.rel_l2 <= c.tolerance,
    `relative L2 error ${c.rel_l2} above tolerance ${c.tolerance}`);
  assert(Number.isFinite(c.lse_max_abs) && c.lse_max_abs <= c.lse_bound,
    `LSE error ${c.lse_max_abs} above ${c.lse_bound}`);
  assert(c.passed === true, 'page did not report a pass');
  const g = r.gradients;
  assert(!g.skipped, `gradients check skipped: ${g.skipped}`);
  for (const which of ['dq', 'dk', 'dv']) {
    const err = g[`${which}_rel_l2`];
    assert(Number.isFinite(err) && err <= g.tolerance, `${which} relative L2 error ${err} above tolerance ${g.tolerance}`);
  }
  assert(g.passed === true && g.backward_ms > 0, 'page did not report a gradients pass');
  assert(r.heatmap.row_sum_max_err < 1e-3, `rows of P sum to 1 +- ${r.heatmap.row_sum_max_err}`);
  const n = config.seqlen;
  assert(r.heatmap.rows === n && r.heatmap.cols === n, `heatmap ${r.heatmap.rows}x${r.heatmap.cols}, want ${n}x${n}`);
  const expectMasked = n * n - visiblePairs(n, config.causal, config.window_left, config.window_right);
  assert(r.heatmap.masked_cells === expectMasked, `masked cells ${r.heatmap.masked_cells}, want ${expectMasked}`);
  const t = r.timing;
  assert(t.flash_ms > 0 && t.flash_tflops > 0, `flash timing missing: ${JSON.stringify(t)}`);
  assert(t.naive_error === null ? t.naive_ms > 0 : true, 'naive timing missing');
  assert(r.memory.flash_extra_bytes !== null && r.memory.flash_extra_bytes !== undefined, 'flash memory not measured');
  return `rel L2 ${c.rel_l2.toExponential(2)} (tol ${c.tolerance}), LSE ${c.lse_max_abs.toExponential(2)}, ` +
    `grads dq/dk/dv ${[g.dq_rel_l2, g.dk_rel_l2, g.dv_rel_l2].map((x) => x.toExponential(1)).join('/')} (tol ${g.tolerance}), ` +
    `flash ${t.flash_ms.toFixed(2)} ms (${t.timer}), naive ${t.naive_ms ? `${t.naive_ms.toFixed(2)} ms` : t.naive_error}`;
}

async function checkCanvas(page, r, shot) {
  const s = await canvasStats(page);
  assert(s.drawn === 'true', 'canvas not marked drawn');
  assert(s.width === r.heatmap.cols && s.height === r.heatmap.rows, `canvas ${s.width}x${s.height}`);
  assert(s.variance > 100, `heatmap pixel variance ${s.variance.toFixed(1)} is too flat`);
  assert(s.masked === r.heatmap.masked_cells, `${s.masked} masked pixels, report says ${r.heatmap.masked_cells}`);
  await page.locator('main').screenshot({ path: join(shots, shot) });
  return s;
}

const CAUSAL = {
  seqlen: 192, heads: 2, head_dim: 64, dtype: 'f32', causal: true, alibi: false,
  window_left: -1, window_right: -1, softcap: 0, heatmap_head: 1, iters: 3, seed: 11,
  check: 'always', naive: true,
};
const WINDOW = {
  ...CAUSAL, seqlen: 211, head_dim: 40, causal: false, window_left: 40, window_right: 12, seed: 12,
};
const ALIBI_BF16 = {
  ...CAUSAL, seqlen: 160, heads: 4, head_dim: 96, dtype: 'bf16', alibi: true, softcap: 3,
  heatmap_head: 0, seed: 13,
};

const cases = [];
const test = (name, fn) => cases.push({ name, fn });
let ctx = null; // { browser, page, logs } shared by the WebGPU cases

test('page finds the SwiftShader WebGPU adapter', async () => {
  const browser = await launch(WEBGPU_ARGS);
  const { page, logs } = await openPage(browser);
  ctx = { browser, page, logs };
  const state = await page.evaluate(() => document.body.dataset.state);
  const banner = await page.textContent('#support');
  assert(state === 'ready', `state ${state}: ${banner}\n${logs.join('\n')}`);
  const info = await page.evaluate(() => window.flashattnAdapter);
  assert(info.description.length > 0, 'empty adapter description');
  assert(/swiftshader/i.test(info.browser_name), `adapter "${info.browser_name}" is not SwiftShader`);
  const f16 = await page.evaluate(() => !document.querySelector('select[name=dtype] option[value=f16]').disabled);
  assert(f16 === info.shader_f16, `f16 option enabled=${f16} but shader_f16=${info.shader_f16}`);
  return `${info.browser_name} / ${info.description}; dtypes ${info.dtypes.join(',')}; timer ${info.timestamps ? 'timestamps' : 'host'}`;
});

test('causal case matches the reference (forward and gradients) and draws a triangle', async () => {
  assert(ctx, 'no page');
  const r = await runCase(ctx.page, CAUSAL);
  const detail = checkReport(r, CAUSAL);
  const s = await checkCanvas(ctx.page, r, 'causal.png');
  assert(s.topRight.join() === '52,52,58', `top-right cell should be masked, is ${s.topRight}`);
  assert(s.bottomLeft.join() !== '52,52,58', 'bottom-left cell should be visible');
  return detail;
});

test('sliding-window case matches the reference and draws a band', async () => {
  assert(ctx, 'no page');
  const r = await runCase(ctx.page, WINDOW);
  const detail = checkReport(r, WINDOW);
  const s = await checkCanvas(ctx.page, r, 'window.png');
  assert(s.topRight.join() === '52,52,58' && s.bottomLeft.join() === '52,52,58',
    'both far corners should be masked by the window');
  return detail;
});

test('ALiBi + softcap in bf16 matches the reference', async () => {
  assert(ctx, 'no page');
  const r = await runCase(ctx.page, ALIBI_BF16);
  const detail = checkReport(r, ALIBI_BF16);
  await checkCanvas(ctx.page, r, 'alibi-bf16.png');
  // ALiBi (slope 1/4 on head 0): weights fall by orders of magnitude away from the diagonal.
  const v = r.heatmap.values;
  const n = ALIBI_BF16.seqlen;
  const row = n - 1;
  assert(v[row * n + row] > 100 * v[row * n + row - 40], 'no ALiBi decay along the last row');
  return detail;
});

test('an invalid field is reported, naming it', async () => {
  assert(ctx, 'no page');
  await ctx.page.evaluate(() => window.flashattn.run({ head_dim: 300 }));
  const state = await ctx.page.evaluate(() => document.body.dataset.state);
  const msg = await ctx.page.textContent('#message');
  assert(state === 'error' && msg.includes('head_dim') && msg.includes('300'), `state ${state}, message "${msg}"`);
  await ctx.page.evaluate(() => window.flashattn.setForm({ head_dim: 64 }));
  return msg;
});

test('without navigator.gpu the page says WebGPU is missing', async () => {
  assert(ctx, 'no browser');
  const context = await ctx.browser.newContext();
  await context.addInitScript(() => { delete Navigator.prototype.gpu; });
  const page = await context.newPage();
  await page.goto(url);
  await page.waitForFunction(() => document.body.dataset.state !== 'loading');
  const state = await page.evaluate(() => document.body.dataset.state);
  const banner = await page.textContent('#support');
  assert(state === 'no-webgpu' && banner.includes('WebGPU is not available'), `state ${state}: ${banner}`);
  assert(await page.isDisabled('#run'), 'Run button should stay disabled');
  await page.screenshot({ path: join(shots, 'no-webgpu.png') });
  await context.close();
  return banner.slice(0, 80);
});

test('without an adapter (no WebGPU flags) the page says so', async () => {
  const browser = await launch([]);
  try {
    const { page } = await openPage(browser);
    const state = await page.evaluate(() => document.body.dataset.state);
    const banner = await page.textContent('#support');
    assert(state === 'no-adapter' && banner.includes('no usable adapter'), `state ${state}: ${banner}`);
    return banner.slice(0, 100);
  } finally {
    await browser.close();
  }
});

let passed = 0;
let failed = 0;
for (const { name, fn } of cases) {
  const t0 = Date.now();
  try {
    const detail = await Promise.race([
      fn(),
      new Promise((_, reject) => setTimeout(() => reject(new Error('timed out')), RUN_TIMEOUT_MS)),
    ]);
    passed++;
    console.log(`ok   ${name} (${((Date.now() - t0) / 1000).toFixed(1)} s): ${detail}`);
  } catch (e) {
    failed++;
    console.log(`FAIL ${name}: ${e.message}`);
    if (ctx) console.log(ctx.logs.slice(-20).map((l) => `  | ${l}`).join('\n'));
  }
}
if (ctx) await ctx.browser.close();
console.log(`screenshots in ${shots}`);
console.log(`e2e: ${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
