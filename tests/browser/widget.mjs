// Browser checks of the embeddable chat widget in headless Chromium.
//
//   node tests/browser/widget.mjs '{"scenario":"journey","page":"http://127.0.0.1:PORT/"}'
//
// On success prints one line of JSON (the scenario's observations) and exits 0;
// on failure prints the reason to stderr and exits 1. Every page fails its scenario
// on a Content-Security-Policy violation or an uncaught page error. Never downloads
// a browser: it runs $AGORA_CHROMIUM or /usr/bin/chromium.
import { chromium } from 'playwright-core';
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';

const TIMEOUT = 30_000;
const VIEWPORT = { width: 1024, height: 700 };
const SESSION_PATH = '/api/agent-gateway/widget/session/';
const INVOKE_PATH = '/api/agent-gateway/invoke/';

// Runs in every document before its own scripts.
function recorder() {
  const t = (window.__agoraTest = { csp: [], errors: [], events: [] });
  window.addEventListener('securitypolicyviolation', (e) => {
    t.csp.push({ directive: e.violatedDirective, blocked: e.blockedURI, sample: e.sample, source: e.sourceFile, line: e.lineNumber });
  }, true);
  window.addEventListener('error', (e) => t.errors.push(String(e.message)));
  window.addEventListener('unhandledrejection', (e) => t.errors.push(`unhandled rejection: ${e.reason && e.reason.stack ? e.reason.stack : e.reason}`));
  window.addEventListener('agora-widget', (e) => t.events.push(e.detail && e.detail.state));
}

const pages = [];

async function newPage(browser) {
  const context = await browser.newContext({ viewport: VIEWPORT });
  const page = await context.newPage();
  page.setDefaultTimeout(TIMEOUT);
  const diag = { console: [], pageErrors: [], requests: [] };
  await page.addInitScript(recorder);
  page.on('console', (m) => { if (m.type() === 'error') diag.console.push(m.text()); });
  page.on('pageerror', (e) => diag.pageErrors.push(String((e && e.stack) || e)));
  page.on('request', (r) => diag.requests.push({ method: r.method(), url: r.url() }));
  const p = { page, context, diag };
  pages.push(p);
  return p;
}

// Fails on anything the page itself reported. Chromium also logs every non-2xx
// answer as "Failed to load resource"; those are expected in some scenarios and the
// scenario asserts the outcome instead. CORS refusals are expected only where allowed.
async function assertClean(p, { allowCors = false } = {}) {
  const t = await p.page.evaluate(() => window.__agoraTest);
  if (!t) throw new Error('the recorder init script did not run');
  if (t.csp.length) throw new Error(`Content-Security-Policy violation(s): ${JSON.stringify(t.csp)}`);
  const errors = [...t.errors, ...p.diag.pageErrors];
  if (errors.length) throw new Error(`uncaught page error(s): ${JSON.stringify(errors)}`);
  const bad = p.diag.console.filter((m) => !/^Failed to load resource: /.test(m) && !(allowCors && /CORS policy/.test(m)));
  if (bad.length) throw new Error(`console error(s): ${JSON.stringify(bad)}`);
  return t;
}

async function until(page, what, fn, arg, polling = 50) {
  try {
    return await (await page.waitForFunction(fn, arg, { timeout: TIMEOUT, polling })).jsonValue();
  } catch (e) {
    if (e && e.name === 'TimeoutError') throw new Error(`timed out after ${TIMEOUT / 1000} s waiting for ${what}`);
    throw e;
  }
}

const hook = (name) => `[data-agora="${name}"]`;

async function gotoAndWaitLauncher(page, url) {
  const start = Date.now();
  await page.goto(url, { waitUntil: 'commit' });
  // Checked every frame, so the time is that of the first frame showing it.
  const seen = await until(page, 'the launcher to become visible', () => {
    const s = document.querySelector('script[data-key]');
    const state = s && s.dataset.agoraState;
    if (state === 'refused' || state === 'error') return state;
    const h = document.getElementById('agora-widget');
    const l = h && h.shadowRoot && h.shadowRoot.querySelector('[data-agora="launcher"]');
    if (!l) return false;
    const r = l.getBoundingClientRect();
    return r.width > 0 && r.height > 0 && r.bottom <= innerHeight && r.right <= innerWidth && getComputedStyle(l).visibility === 'visible' && 'visible';
  }, undefined, 'raf');
  if (seen !== 'visible') throw new Error(`the loader settled as "${seen}" instead of showing the launcher`);
  return Date.now() - start;
}

// Opens the panel; asserts the greeting is already there and focus is on the input.
async function openWidget(page) {
  await page.locator(hook('launcher')).click();
  await page.locator(hook('panel')).waitFor({ state: 'visible', timeout: TIMEOUT });
  const s = await page.evaluate(() => {
    const root = document.getElementById('agora-widget').shadowRoot;
    const first = root.querySelector('[data-agora="log"] [data-agora="message"]');
    const a = root.activeElement;
    const launcher = root.querySelector('[data-agora="launcher"]');
    const panel = root.querySelector('[data-agora="panel"]');
    return {
      focus: a ? a.getAttribute('data-agora') : null,
      firstRole: first && first.dataset.role,
      greeting: first ? first.textContent : null,
      expanded: launcher.getAttribute('aria-expanded'),
      panelRole: panel.getAttribute('role'),
      panelLabel: panel.getAttribute('aria-label'),
    };
  });
  if (s.focus !== 'input') throw new Error(`focus did not move to the message input on open (it is on ${s.focus})`);
  if (s.firstRole !== 'assistant' || !s.greeting) throw new Error(`the greeting is not the first assistant message on open: ${JSON.stringify(s)}`);
  if (s.expanded !== 'true') throw new Error(`launcher aria-expanded is ${s.expanded} while the panel is open`);
  if (s.panelRole !== 'dialog' || !s.panelLabel) throw new Error(`the panel is not a labelled dialog: ${JSON.stringify(s)}`);
  return s.greeting;
}

const finishedReplies = () => `
  (() => {
    const root = document.getElementById('agora-widget').shadowRoot;
    return root.querySelectorAll('[data-agora="log"] [data-agora="message"][data-role="assistant"]:not([data-streaming])').length;
  })()`;

// Sends `text` with Enter and waits for the reply to complete or an error alert.
async function send(page, text) {
  const before = await page.evaluate(finishedReplies());
  const input = page.locator(hook('input'));
  await input.fill(text);
  await input.press('Enter');
  return until(page, `the reply to "${text}" or an error`, (n) => {
    const root = document.getElementById('agora-widget').shadowRoot;
    const err = root.querySelector('[data-agora="panel"] [role="alert"][data-agora="error"]');
    if (err) return { kind: 'error', text: err.textContent };
    const done = root.querySelectorAll('[data-agora="log"] [data-agora="message"][data-role="assistant"]:not([data-streaming])');
    if (done.length > n && !root.querySelector('[data-streaming="true"]')) return { kind: 'reply', text: done[done.length - 1].textContent };
    return false;
  }, before);
}

async function sendExpectReply(page, text) {
  const r = await send(page, text);
  if (r.kind !== 'reply') throw new Error(`expected a reply to "${text}", got the error alert: ${r.text}`);
  if (!r.text.trim()) throw new Error(`the reply to "${text}" is empty`);
  return r.text;
}

async function transcript(page) {
  return page.evaluate(() => {
    const root = document.getElementById('agora-widget').shadowRoot;
    return [...root.querySelectorAll('[data-agora="log"] [data-agora="message"]')].map((m) => ({
      role: m.dataset.role, text: m.textContent, elements: m.children.length, streaming: m.dataset.streaming || null,
    }));
  });
}

function assertTextOnly(messages) {
  const bad = messages.filter((m) => m.elements > 0);
  if (bad.length) throw new Error(`message(s) contain elements, not only text: ${JSON.stringify(bad)}`);
}

const assetRequests = (p) => p.diag.requests.filter((r) => /\/widget\/widget\.(js|css)(\?|$)/.test(r.url)).map((r) => r.url);
const countRequests = (p, path) => p.diag.requests.filter((r) => r.method === 'POST' && new URL(r.url).pathname === path).length;

const scenarios = {
  async journey(browser, args) {
    const text = args.text || 'hello widget';
    const p = await newPage(browser);
    const { page } = p;
    const launcher_ms = await gotoAndWaitLauncher(page, args.page);
    const early = assetRequests(p);
    if (early.length) throw new Error(`widget assets were requested before the first open: ${early.join(', ')}`);
    const greeting = await openWidget(page);
    if (assetRequests(p).length < 2) throw new Error(`opening did not load widget.js and widget.css: ${assetRequests(p)}`);

    await page.evaluate(() => {
      const root = document.getElementById('agora-widget').shadowRoot;
      const log = root.querySelector('[data-agora="log"]');
      const ann = root.querySelector('[data-agora="announcer"]');
      const input = root.querySelector('[data-agora="input"]');
      const obs = (window.__agoraObs = { lengths: [], t0: null, firstAt: null, announced: [] });
      input.addEventListener('keydown', (e) => { if (e.key === 'Enter' && obs.t0 === null) obs.t0 = performance.now(); }, true);
      new MutationObserver(() => {
        const s = log.querySelector('[data-agora="message"][data-role="assistant"][data-streaming="true"]');
        if (!s) return;
        const n = s.textContent.length;
        if (n > 0 && !obs.lengths.includes(n)) obs.lengths.push(n);
        if (n > 0 && obs.firstAt === null) {
          obs.firstAt = -1;
          requestAnimationFrame(() => { obs.firstAt = performance.now(); });
        }
      }).observe(log, { subtree: true, childList: true, characterData: true, attributes: true });
      new MutationObserver((records) => {
        for (const r of records) {
          obs.announced.push({ text: ann.textContent, streaming: !!log.querySelector('[data-streaming="true"]') });
        }
      }).observe(ann, { subtree: true, childList: true, characterData: true });
    });

    const reply = await sendExpectReply(page, text);
    const obs = await until(page, 'the first-token paint time', () => {
      const o = window.__agoraObs;
      return o.firstAt > 0 && o;
    });
    const partial_lengths = obs.lengths;
    if (partial_lengths.length < 3) {
      throw new Error(`the reply did not grow in the DOM while streaming: saw partial lengths ${JSON.stringify(partial_lengths)} (need at least 3 distinct) for final reply ${JSON.stringify(reply)}`);
    }
    if (obs.t0 === null) throw new Error('the Enter keydown was not observed');
    const first_token_ms = Math.round(obs.firstAt - obs.t0);
    if (obs.announced.length !== 1) throw new Error(`the announcer was set ${obs.announced.length} times (expected exactly once): ${JSON.stringify(obs.announced)}`);
    if (obs.announced[0].text !== reply) throw new Error(`the announcer holds ${JSON.stringify(obs.announced[0].text)}, not the complete reply ${JSON.stringify(reply)}`);
    if (obs.announced[0].streaming) throw new Error('the announcer was set while the reply was still streaming');

    const messages = await transcript(page);
    assertTextOnly(messages);
    const roles = messages.map((m) => m.role).join(',');
    if (roles !== 'assistant,user,assistant' || messages[1].text !== text) {
      throw new Error(`unexpected transcript: ${JSON.stringify(messages)}`);
    }

    await page.keyboard.press('Escape');
    await page.locator(hook('panel')).waitFor({ state: 'hidden', timeout: TIMEOUT }).catch(() => {
      throw new Error(`Escape did not close the panel within ${TIMEOUT / 1000} s`);
    });
    const after = await page.evaluate(() => {
      const root = document.getElementById('agora-widget').shadowRoot;
      const a = root.activeElement;
      return { focus: a ? a.getAttribute('data-agora') : null, expanded: root.querySelector('[data-agora="launcher"]').getAttribute('aria-expanded') };
    });
    if (after.focus !== 'launcher') throw new Error(`Escape did not return focus to the launcher (it is on ${after.focus})`);
    if (after.expanded !== 'false') throw new Error(`launcher aria-expanded is ${after.expanded} after closing`);

    const t = await assertClean(p);
    const state = await page.evaluate(() => document.querySelector('script[data-key]').dataset.agoraState);
    if (state !== 'ready' || t.events.join() !== 'ready') throw new Error(`loader state ${state}, events ${JSON.stringify(t.events)}; expected ready`);
    return { launcher_ms, first_token_ms, greeting, reply, partial_lengths };
  },

  async refused(browser, args) {
    const p = await newPage(browser);
    const { page } = p;
    await page.goto(args.page, { waitUntil: 'commit' });
    try {
      await page.waitForSelector('script[data-key][data-agora-state="refused"], script[data-key][data-agora-state="error"]', { state: 'attached', timeout: TIMEOUT });
    } catch (e) {
      const state = await page.evaluate(() => { const s = document.querySelector('script[data-key]'); return s && s.dataset.agoraState; }).catch(() => null);
      throw new Error(`the loader did not settle as refused or error within ${TIMEOUT / 1000} s (state: ${state})`);
    }
    const s = await page.evaluate(() => ({
      state: document.querySelector('script[data-key]').dataset.agoraState,
      hosts: document.querySelectorAll('#agora-widget').length,
    }));
    if (s.hosts) throw new Error(`#agora-widget exists after the loader settled as ${s.state}`);
    if (await page.locator(hook('launcher')).count()) throw new Error('a launcher exists although the key was refused');
    if (assetRequests(p).length) throw new Error(`widget assets were requested although the key was refused: ${assetRequests(p)}`);
    const t = await assertClean(p, { allowCors: true });
    if (t.events.join() !== s.state) throw new Error(`agora-widget events ${JSON.stringify(t.events)}, expected [${s.state}]`);
    return { state: s.state };
  },

  async refresh(browser, args) {
    const wait = Number(args.wait_ms);
    if (!(wait >= 0)) throw new Error('refresh needs wait_ms');
    const p = await newPage(browser);
    const { page } = p;
    await gotoAndWaitLauncher(page, args.page);
    await openWidget(page);
    const visitor = await page.evaluate(() => window.__agoraWidget.visitor);
    const first = await sendExpectReply(page, 'first');
    await page.waitForTimeout(wait);
    const second = await sendExpectReply(page, 'second');
    const messages = await transcript(page);
    assertTextOnly(messages);
    const shape = messages.map((m) => `${m.role}${m.role === 'user' ? `:${m.text}` : ''}`).join(',');
    if (shape !== 'assistant,user:first,assistant,user:second,assistant') throw new Error(`unexpected transcript: ${JSON.stringify(messages)}`);
    if (messages[2].text !== first || messages[4].text !== second) throw new Error(`replies out of place: ${JSON.stringify(messages)}`);
    if (await page.locator(`${hook('panel')} [role="alert"]`).count()) throw new Error('an error alert is shown');
    const after = await page.evaluate(() => window.__agoraWidget.visitor);
    if (after !== visitor) throw new Error(`the visitor changed across the refresh: ${visitor} -> ${after}`);
    await assertClean(p);
    return { replies: [first, second], visitor, session_requests: countRequests(p, SESSION_PATH), invoke_requests: countRequests(p, INVOKE_PATH) };
  },

  async ratelimited(browser, args) {
    const sends = Number(args.sends);
    if (!(sends >= 1)) throw new Error('ratelimited needs sends >= 1');
    const p = await newPage(browser);
    const { page } = p;
    await gotoAndWaitLauncher(page, args.page);
    await openWidget(page);
    const outcomes = [];
    let last;
    for (let i = 1; i <= sends; i++) {
      last = await send(page, `message ${i}`);
      outcomes.push(last.kind);
    }
    if (last.kind !== 'error') throw new Error(`the last of ${sends} sends got a reply, not an error alert: ${JSON.stringify(outcomes)}`);
    if (!/wait|quickly/i.test(last.text)) throw new Error(`the alert does not say to wait: ${JSON.stringify(last.text)}`);
    const alert = (await page.locator(`${hook('panel')} [role="alert"]${hook('error')} p`).textContent()).trim();
    const retry = page.locator(`${hook('panel')} [role="alert"]${hook('error')} ${hook('retry')}`);
    if ((await retry.count()) !== 1) throw new Error('the alert has no retry button');

    // Retry re-sends the same message without adding another user bubble.
    const users = async () => (await transcript(page)).filter((m) => m.role === 'user').map((m) => m.text);
    const before = await users();
    const done = await page.evaluate(finishedReplies());
    await retry.click();
    const retried = await until(page, 'the outcome of Retry', (n) => {
      const root = document.getElementById('agora-widget').shadowRoot;
      const err = root.querySelector('[data-agora="panel"] [role="alert"][data-agora="error"]');
      if (err) return { kind: 'error', text: err.textContent };
      const fin = root.querySelectorAll('[data-agora="message"][data-role="assistant"]:not([data-streaming])');
      return fin.length > n && !root.querySelector('[data-streaming="true"]') ? { kind: 'reply' } : false;
    }, done);
    const afterRetry = await users();
    if (JSON.stringify(afterRetry) !== JSON.stringify(before) || before.length !== sends) {
      throw new Error(`Retry changed the user's messages: ${JSON.stringify(before)} -> ${JSON.stringify(afterRetry)}`);
    }
    assertTextOnly(await transcript(page));
    await assertClean(p);
    return { alert, outcomes, retry_outcome: retried.kind };
  },

  async axe(browser, args) {
    const p = await newPage(browser);
    const { page } = p;
    await gotoAndWaitLauncher(page, args.page);
    await openWidget(page);
    await sendExpectReply(page, args.text || 'hello axe');
    // Evaluated over the devtools protocol, which the page's CSP does not govern
    // (an injected <script> would be refused by script-src).
    const require = createRequire(import.meta.url);
    await page.evaluate(readFileSync(require.resolve('axe-core/axe.min.js'), 'utf8'));
    const r = await page.evaluate(async () => {
      const res = await window.axe.run(document);
      const brief = (x) => ({ id: x.id, impact: x.impact, help: x.help, nodes: x.nodes.map((n) => ({ target: n.target, summary: n.failureSummary })) });
      return {
        violations: res.violations.map(brief),
        incomplete: res.incomplete.map(brief),
        passes: res.passes.map((x) => ({ id: x.id, targets: x.nodes.map((n) => n.target) })),
        version: window.axe.version,
      };
    });
    if (r.violations.length) throw new Error(`axe ${r.version} found ${r.violations.length} violation(s): ${JSON.stringify(r.violations, null, 1)}`);
    const contrast = r.passes.find((x) => x.id === 'color-contrast');
    // A target that is an array of selectors names a node inside a shadow root.
    const inShadow = (x) => x && x.targets.some((t) => Array.isArray(t[0]) || t.length > 1);
    if (!inShadow(contrast)) {
      throw new Error(`axe's color-contrast rule did not pass on the widget's shadow DOM: ${JSON.stringify({ contrast, incomplete: r.incomplete.filter((x) => x.id === 'color-contrast') })}`);
    }
    await assertClean(p);
    return {
      violations: 0,
      passes: r.passes.length,
      pass_ids: r.passes.map((x) => x.id),
      incomplete: r.incomplete.map((x) => x.id),
      axe_version: r.version,
    };
  },

  async two_visitors(browser, args) {
    const tag = () => Math.random().toString(36).slice(2, 10);
    const a = `alpha-${tag()}`;
    const b = `bravo-${tag()}`;
    const pa = await newPage(browser);
    const pb = await newPage(browser);
    for (const [p, foreign] of [[pa, b], [pb, a]]) {
      await gotoAndWaitLauncher(p.page, args.page);
      await openWidget(p.page);
      await p.page.evaluate((f) => {
        const log = document.getElementById('agora-widget').shadowRoot.querySelector('[data-agora="log"]');
        const seen = (window.__agoraForeign = []);
        new MutationObserver(() => { if (log.textContent.includes(f)) seen.push(log.textContent); })
          .observe(log, { subtree: true, childList: true, characterData: true });
      }, foreign);
    }
    const [ra, rb] = await Promise.all([sendExpectReply(pa.page, a), sendExpectReply(pb.page, b)]);
    const va = await pa.page.evaluate(() => window.__agoraWidget.visitor);
    const vb = await pb.page.evaluate(() => window.__agoraWidget.visitor);
    if (!va || !vb || va === vb) throw new Error(`the two contexts are not separate visitors: ${va} / ${vb}`);
    for (const [p, own, foreign, name] of [[pa, a, b, 'A'], [pb, b, a, 'B']]) {
      const leaked = await p.page.evaluate(() => window.__agoraForeign);
      const now = (await transcript(p.page)).map((m) => m.text).join('\n');
      if (leaked.length || now.includes(foreign)) throw new Error(`visitor ${name}'s log contained the other visitor's text ${foreign}`);
      if (!now.includes(own)) throw new Error(`visitor ${name}'s log lacks its own message ${own}`);
      await assertClean(p);
    }
    return { a, b, reply_a: ra, reply_b: rb, visitors: [va, vb] };
  },

  async screenshot(browser, args) {
    if (!args.path) throw new Error('screenshot needs path');
    const p = await newPage(browser);
    const { page } = p;
    await gotoAndWaitLauncher(page, args.page);
    await openWidget(page);
    const reply = await sendExpectReply(page, args.text || 'What are your opening hours?');
    await page.screenshot({ path: args.path });
    await assertClean(p);
    return { path: args.path, reply };
  },
};

async function main() {
  let args;
  try {
    args = JSON.parse(process.argv[2] || '');
  } catch (e) {
    throw new Error(`usage: node widget.mjs '{"scenario":"journey","page":"http://..."}' (${e.message})`);
  }
  const run = scenarios[args.scenario];
  if (!run) throw new Error(`unknown scenario ${JSON.stringify(args.scenario)}; known: ${Object.keys(scenarios).join(', ')}`);
  if (typeof args.page !== 'string') throw new Error('the scenario needs "page", the URL of a host page');
  const browser = await chromium.launch({
    executablePath: process.env.AGORA_CHROMIUM || '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  try {
    const out = await run(browser, args);
    process.stdout.write(`${JSON.stringify(out)}\n`);
  } catch (e) {
    const notes = [];
    for (const p of pages) {
      const dom = await p.page.evaluate(() => {
        const h = document.getElementById('agora-widget');
        return h && h.shadowRoot ? h.shadowRoot.innerHTML.slice(-3000) : '(no widget)';
      }).catch(() => '(page gone)');
      notes.push(`page ${p.page.url()}\n  widget DOM (tail): ${dom}\n  console errors: ${JSON.stringify(p.diag.console.slice(-10))}`);
    }
    e.message += `\n${notes.join('\n')}`;
    throw e;
  } finally {
    await browser.close().catch(() => {});
  }
}

main().then(() => process.exit(0), (e) => {
  let name = '';
  try { name = ` ${JSON.parse(process.argv[2]).scenario}`; } catch (_) { /* reported by main */ }
  process.stderr.write(`widget${name}: ${(e && e.message) || e}\n`);
  process.exit(1);
});
