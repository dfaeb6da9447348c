// Agora chat widget loader. Exchanges the publishable key for a visitor session,
// then shows a launcher; the chat itself (widget.js, widget.css) loads on first open.
// Everything lives in one shadow root; the only global is window.__agoraWidget.
(() => {
  'use strict';
  const script = document.currentScript;
  const W = window;
  if (!script || W.__agoraWidget) return;

  const VERSION = '__AGORA_WIDGET_VERSION__';
  const d = script.dataset;
  const base = new URL(script.src).origin;
  const ns = (W.__agoraWidget = { version: VERSION, base, script, key: d.key });

  const settle = (state) => {
    d.agoraState = state;
    W.dispatchEvent(new CustomEvent('agora-widget', { detail: { state } }));
  };

  // The key rides in the query too: the CORS preflight has no body, and the
  // gateway answers it only for an origin that key allows. Any failure rejects with
  // an Error whose `status` is the HTTP status (absent when the page may not read one).
  ns.session = (token) =>
    fetch(`${base}/api/agent-gateway/widget/session/?key=${encodeURIComponent(ns.key)}`, {
      method: 'POST',
      mode: 'cors',
      credentials: 'omit',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify(token ? { key: ns.key, token } : { key: ns.key }),
    }).then(async (r) => {
      const body = await r.json().catch(() => null);
      if (!r.ok || !body || typeof body.token !== 'string') {
        throw Object.assign(new Error(`session ${r.status}`), {
          status: r.status,
          retryAfter: r.headers.get('retry-after'),
        });
      }
      const ttl = Math.max(0, Number(body.expires_in) || 0) * 1000;
      Object.assign(ns, { token: body.token, ttl, expiresAt: Date.now() + ttl, visitor: body.visitor });
      return body;
    });

  // One refresh in flight at a time; it keeps the visitor by presenting the current token.
  let refreshing = null;
  ns.refresh = () =>
    refreshing || (refreshing = ns.session(ns.token).finally(() => (refreshing = null)));

  const color = (c) => typeof c === 'string' && CSS.supports('color', c) &&
    !/^\s*(currentcolor|transparent|inherit|initial|unset|revert(-layer)?)\s*$/i.test(c);
  const ink = (accent) => {
    const ctx = document.createElement('canvas').getContext('2d');
    if (!ctx) return '#fff';
    ctx.fillStyle = accent;
    const m = /^#(..)(..)(..)$/.exec(ctx.fillStyle);
    if (!m) return '#fff';
    const [r, g, b] = m.slice(1).map((h) => {
      const c = parseInt(h, 16) / 255;
      return c <= 0.04045 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4;
    });
    // Above this luminance dark text contrasts more than white does.
    return 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.179 ? '#111' : '#fff';
  };

  const CSS_TEXT =
    ':host{all:initial!important}' +
    '.agora{--agora-accent:#1f4fd1;--agora-ink:#fff;color-scheme:light;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1a1a1a}' +
    '.launcher{position:fixed;bottom:20px;right:20px;z-index:2147483000;display:inline-flex;align-items:center;gap:8px;margin:0;padding:12px 18px;border:0;border-radius:999px;background:var(--agora-accent);color:var(--agora-ink);font:inherit;font-weight:600;cursor:pointer;box-shadow:0 4px 14px rgba(0,0,0,.25)}' +
    '.agora[data-position=bottom-left] .launcher{right:auto;left:20px}' +
    '.launcher:focus-visible{outline:3px solid var(--agora-accent);outline-offset:3px}' +
    '.launcher svg{width:20px;height:20px;fill:currentColor;flex:none}' +
    '@media print{.agora{display:none}}';

  const load = (k, f) => ns[k] || (ns[k] = f().catch((e) => { ns[k] = null; throw e; }));

  const mount = (widget) => {
    const cfg = (ns.config = {
      title: d.title || widget.title || 'Chat',
      greeting: typeof widget.greeting === 'string' ? widget.greeting : '',
      accent: [d.accent, widget.accent].find(color) || '#1f4fd1',
      position: [d.position, widget.position].find((p) => p === 'bottom-left' || p === 'bottom-right') || 'bottom-right',
      launcherText: d.launcherText || widget.launcher_text || 'Chat with us',
    });

    const host = (ns.host = document.createElement('div'));
    host.id = 'agora-widget';
    const root = (ns.root = host.attachShadow({ mode: 'open' }));
    const sheet = new CSSStyleSheet();
    sheet.replaceSync(CSS_TEXT);
    root.adoptedStyleSheets = [sheet];

    const wrap = (ns.wrap = document.createElement('div'));
    wrap.className = 'agora';
    wrap.dataset.position = cfg.position;
    wrap.style.setProperty('--agora-accent', cfg.accent);
    wrap.style.setProperty('--agora-ink', ink(cfg.accent));

    const btn = (ns.launcher = document.createElement('button'));
    btn.type = 'button';
    btn.className = 'launcher';
    btn.dataset.agora = 'launcher';
    // The accessible name starts with the visible text (WCAG 2.5.3).
    btn.setAttribute('aria-label', `${cfg.launcherText}: open ${cfg.title} chat`);
    btn.setAttribute('aria-haspopup', 'dialog');
    btn.setAttribute('aria-expanded', 'false');
    const svgNS = 'http://www.w3.org/2000/svg';
    const svg = document.createElementNS(svgNS, 'svg');
    svg.setAttribute('viewBox', '0 0 24 24');
    svg.setAttribute('aria-hidden', 'true');
    const path = document.createElementNS(svgNS, 'path');
    path.setAttribute('d', 'M4 4h16a2 2 0 0 1 2 2v10a2 2 0 0 1-2 2H9l-5 4v-4a2 2 0 0 1-2-2V6a2 2 0 0 1 2-2z');
    svg.append(path);
    const label = document.createElement('span');
    label.textContent = cfg.launcherText;
    btn.append(svg, label);

    btn.addEventListener('click', () => {
      if (ns.widget) return ns.widget.toggle();
      if (btn.getAttribute('aria-busy')) return;
      btn.setAttribute('aria-busy', 'true');
      const q = `?v=${encodeURIComponent(VERSION)}`;
      Promise.all([
        load('css', () =>
          fetch(`${base}/widget/widget.css${q}`, { credentials: 'omit' }).then((r) => {
            if (!r.ok) throw new Error(`widget.css ${r.status}`);
            return r.text();
          }).then((text) => {
            const s = new CSSStyleSheet();
            s.replaceSync(text);
            return s;
          })),
        load('js', () => new Promise((resolve, reject) => {
          const s = document.createElement('script');
          s.src = `${base}/widget/widget.js${q}`;
          s.async = true;
          s.onload = () => (ns.widget ? resolve() : reject(new Error('widget.js')));
          s.onerror = () => { s.remove(); reject(new Error('widget.js')); };
          root.append(s);
        })),
      ]).then(([s]) => {
        root.adoptedStyleSheets = [sheet, s];
        ns.widget.open();
      }, () => {}).finally(() => btn.removeAttribute('aria-busy'));
    });

    wrap.append(btn);
    root.append(wrap);
    document.body.append(host);
    settle('ready');
  };

  if (!ns.key) return settle('error');
  ns.session().then(
    (body) => new Promise((resolve) => {
      if (document.body) resolve();
      else document.addEventListener('DOMContentLoaded', resolve, { once: true });
    }).then(() => mount(body.widget || {})),
  ).catch((e) => {
    if (ns.host) ns.host.remove();
    settle(e && e.status === 403 ? 'refused' : 'error');
  });
})();
