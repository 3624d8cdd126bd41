// The page in a real browser: Debian's Chromium, headless, a fresh profile, driven by
// playwright-core (no browser download). Run by tests/web.rs:
//
//   node tests/browser/page.mjs --url http://127.0.0.1:PORT/ --points 32 \
//     --drop PHOTO --drop-label LABEL --pick PHOTO --pick-label LABEL \
//     --screenshot OUT.png [--then-points 40] [--report file:///.../index.html --report-points 40]
//
// Checks: no console errors; the map draws the expected number of points (t-SNE and
// PC1 x PC2); hovering a point shows its photo; dropping a photo and choosing one with
// the file input show their labels; with --then-points, the page follows a new epoch
// (it prints WAITING_FOR_EPOCH when ready for it); the report's offline copy draws too.
// Exits non-zero on the first failed check.
import { chromium } from 'playwright-core';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const args = {};
for (let i = 2; i < process.argv.length; i += 2) args[process.argv[i].replace(/^--/, '')] = process.argv[i + 1];
const need = (k) => { if (!args[k]) throw new Error('missing --' + k); return args[k]; };
const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';
const profile = mkdtempSync(join(tmpdir(), 'fruits-flow-chromium-'));
const errors = [];
const log = (...m) => console.log(...m);

function check(ok, what) {
  if (!ok) throw new Error('check failed: ' + what);
  log('ok -', what);
}

async function open(context, url) {
  const page = await context.newPage();
  page.on('console', (m) => { if (m.type() === 'error') errors.push(url + ': console: ' + m.text()); });
  page.on('pageerror', (e) => errors.push(url + ': page error: ' + e.message));
  page.on('requestfailed', (r) => errors.push(url + ': request failed: ' + r.url() + ' ' + (r.failure() || {}).errorText));
  page.on('response', (r) => { if (r.status() >= 400) errors.push(url + ': HTTP ' + r.status() + ' for ' + r.url()); });
  await page.goto(url);
  return page;
}

async function waitPoints(page, n, what, timeout = 90000) {
  await page.waitForFunction((n) => window.__map && window.__map.ready && window.__map.points === n, n, { timeout })
    .catch(async (e) => { throw new Error(what + ': ' + e.message + ' (map: ' + JSON.stringify(await page.evaluate(() => window.__map))); });
  check(true, what + ': ' + n + ' points on the map');
}

/// Hovers points until one shows a loaded photo in the tooltip.
async function hover(page, n) {
  for (let i = 0; i < Math.min(n, 20); i++) {
    const at = await page.evaluate((i) => window.__map.screen(i), i);
    if (!at) continue;
    await page.mouse.move(at.x, at.y);
    const shown = await page.waitForFunction(() => {
      const img = document.getElementById('tip-img');
      return !document.getElementById('tip').hidden && window.__map.hovered >= 0 && img.complete && img.naturalWidth > 0;
    }, null, { timeout: 10000 }).then(() => true, () => false);
    if (!shown) continue;
    const [text, label, width] = await page.evaluate(() => [
      document.getElementById('tip-text').textContent, window.__map.label(window.__map.hovered),
      document.getElementById('tip-img').naturalWidth]);
    check(text.includes(label), 'hovering point ' + i + ' shows its label (' + label + ') and a ' + width + ' px photo');
    return;
  }
  throw new Error('no hovered point showed its photo');
}

async function answer(page, label, what) {
  await page.waitForFunction(() => document.querySelector('#scores li .label'), null, { timeout: 60000 })
    .catch(async () => { throw new Error(what + ': no answer: ' + await page.textContent('#answer')); });
  const first = await page.textContent('#scores li .label');
  const cluster = await page.textContent('#answer');
  check(first === label, what + ' shows its label: ' + first + ' (' + cluster.replace(/\s+/g, ' ').trim() + ')');
}

const context = await chromium.launchPersistentContext(profile, {
  executablePath,
  headless: true,
  viewport: { width: 1400, height: 1000 },
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
let failed = false;
try {
  const url = need('url');
  const n = Number(need('points'));
  const page = await open(context, url);
  await waitPoints(page, n, 'served page');
  await page.waitForFunction(() => window.__map.tsne && window.__map.projection === 'tsne', null, { timeout: 180000 });
  check(true, 't-SNE arrived and is drawn');
  await hover(page, n);
  await page.selectOption('#projection', 'pc');
  check(await page.evaluate(() => window.__map.projection) === 'pc', 'PC1 x PC2 is drawn on request');
  await page.selectOption('#colour', 'cluster');
  await page.selectOption('#colour', 'label');
  await page.fill('#filter', need('drop-label'));
  check(await page.locator('#legend li').count() === 1, 'the filter leaves one legend entry');
  await page.fill('#filter', '');
  await page.selectOption('#projection', 'tsne');

  // Drop a photo: a DataTransfer with the file's bytes, dispatched on the box.
  const bytes = readFileSync(need('drop')).toString('base64');
  await page.evaluate((b64) => {
    const raw = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const dt = new DataTransfer();
    dt.items.add(new File([raw], 'dropped.jpg', { type: 'image/jpeg' }));
    const box = document.getElementById('drop');
    box.dispatchEvent(new DragEvent('dragover', { dataTransfer: dt, bubbles: true, cancelable: true }));
    box.dispatchEvent(new DragEvent('drop', { dataTransfer: dt, bubbles: true, cancelable: true }));
  }, bytes);
  await answer(page, need('drop-label'), 'a dropped photo');
  await page.setInputFiles('#photo', need('pick'));
  await page.waitForFunction(() => document.querySelector('#answer img') && document.querySelector('#answer img').alt !== 'dropped.jpg');
  await answer(page, need('pick-label'), 'a chosen file');
  await page.screenshot({ path: need('screenshot'), fullPage: true });
  log('screenshot: ' + args.screenshot);

  if (args['then-points']) {
    const before = await page.evaluate(() => window.__map.epoch);
    log('WAITING_FOR_EPOCH');
    await waitPoints(page, Number(args['then-points']), 'after a new epoch', 240000);
    const after = await page.evaluate(() => window.__map.epoch);
    check(after > before, 'the page followed the pipeline from epoch ' + before + ' to ' + after);
  }

  if (args.report) {
    const offline = await open(context, args.report);
    await waitPoints(offline, Number(args['report-points']), 'the report page (offline)');
    check(await offline.evaluate(() => window.__map.tsne), 'the report page holds its t-SNE');
  }
  check(errors.length === 0, 'no console errors' + (errors.length ? ':\n  ' + errors.join('\n  ') : ''));
} catch (e) {
  failed = true;
  console.error(String(e && e.stack || e));
  if (errors.length) console.error('console errors:\n  ' + errors.join('\n  '));
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
process.exit(failed ? 1 : 0);
