// Agora chat widget: the panel, the conversation and the streamed replies.
// Started by loader.js, which hands over window.__agoraWidget (session, config,
// shadow root, launcher). Message text is only ever set as text, never as HTML.
(() => {
  'use strict';
  const ns = window.__agoraWidget;
  if (!ns || ns.widget) return;
  const { base, wrap, launcher, config: cfg } = ns;

  const OFFLINE = 'You seem to be offline. Check your connection and try again.';
  const UNAVAILABLE = 'The assistant is unavailable right now. Please try again.';
  const quickly = (seconds) => {
    const n = Math.ceil(Number(seconds));
    const wait = n > 0 ? `${n} second${n === 1 ? '' : 's'}` : 'a moment';
    return `You're sending messages quickly. Please wait ${wait} and try again.`;
  };

  const el = (tag, attrs, text) => {
    const e = document.createElement(tag);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (text != null) e.textContent = text;
    return e;
  };
  const icon = (d) => {
    const svgNS = 'http://www.w3.org/2000/svg';
    const svg = document.createElementNS(svgNS, 'svg');
    svg.setAttribute('viewBox', '0 0 24 24');
    svg.setAttribute('aria-hidden', 'true');
    const p = document.createElementNS(svgNS, 'path');
    p.setAttribute('d', d);
    svg.append(p);
    return svg;
  };

  const panel = el('div', {
    id: 'agora-panel', class: 'panel', role: 'dialog', 'aria-label': cfg.title, 'data-agora': 'panel', hidden: '',
  });
  const head = el('div', { class: 'head' });
  const closeBtn = el('button', { type: 'button', class: 'close', 'aria-label': 'Close chat', 'data-agora': 'close' });
  closeBtn.append(icon('M6.4 5 12 10.6 17.6 5 19 6.4 13.4 12l5.6 5.6-1.4 1.4-5.6-5.6L6.4 19 5 17.6l5.6-5.6L5 6.4z'));
  head.append(el('h2', { class: 'title' }, cfg.title), closeBtn);
  // The log stays silent; each finished reply is announced once through `announcer`.
  const log = el('div', { class: 'log', role: 'log', 'aria-live': 'off', 'aria-label': 'Messages', tabindex: '0', 'data-agora': 'log' });
  const compose = el('div', { class: 'compose' });
  const input = el('textarea', {
    class: 'input', rows: '1', 'aria-label': 'Message', placeholder: 'Type a message…', 'data-agora': 'input', maxlength: '4000',
  });
  const sendBtn = el('button', { type: 'button', class: 'send', 'aria-label': 'Send message', 'data-agora': 'send' });
  sendBtn.append(icon('M3.4 20.4 21 12 3.4 3.6 3.4 10l12.6 2-12.6 2z'));
  compose.append(input, sendBtn);
  panel.append(head, log, compose);
  const announcer = el('div', { class: 'sr-only', 'aria-live': 'polite', 'data-agora': 'announcer' });
  wrap.append(panel, announcer);
  launcher.setAttribute('aria-controls', 'agora-panel');

  let isOpen = false;
  let greeted = false;
  let busy = false;
  let errorBox = null;

  const nearBottom = () => log.scrollHeight - log.scrollTop - log.clientHeight < 80;
  const toBottom = () => { log.scrollTop = log.scrollHeight; };

  const addMessage = (role, text) => {
    const m = el('div', { class: 'msg', 'data-agora': 'message', 'data-role': role });
    if (text) m.textContent = text;
    const stick = nearBottom();
    log.append(m);
    if (stick || role === 'user') toBottom();
    return m;
  };

  const open = () => {
    if (isOpen) return;
    isOpen = true;
    panel.hidden = false;
    wrap.classList.add('open');
    launcher.setAttribute('aria-expanded', 'true');
    if (!greeted) {
      greeted = true;
      if (cfg.greeting) addMessage('assistant', cfg.greeting);
    }
    toBottom();
    input.focus();
  };
  const close = () => {
    if (!isOpen) return;
    isOpen = false;
    panel.hidden = true;
    wrap.classList.remove('open');
    launcher.setAttribute('aria-expanded', 'false');
    launcher.focus();
  };

  const resize = () => {
    const stick = nearBottom();
    input.style.height = 'auto';
    input.style.height = `${Math.min(input.scrollHeight + 2, 120)}px`;
    if (stick) toBottom();
  };
  const setBusy = (b) => {
    busy = b;
    sendBtn.disabled = b;
    log.setAttribute('aria-busy', String(b));
  };
  const clearError = () => {
    if (errorBox) errorBox.remove();
    errorBox = null;
  };
  const showError = (message, text) => {
    clearError();
    errorBox = el('div', { class: 'error', role: 'alert', 'data-agora': 'error' });
    const retry = el('button', { type: 'button', class: 'retry', 'data-agora': 'retry' }, 'Retry');
    retry.addEventListener('click', () => {
      input.focus();
      deliver(text);
    });
    errorBox.append(el('p', {}, message), retry);
    log.append(errorBox);
    toBottom();
  };

  const failure = (message) => Object.assign(new Error(message), { friendly: message });
  const httpFailure = (status, retryAfter) =>
    failure(status === 429 ? quickly(retryAfter) : UNAVAILABLE);

  const call = (text) =>
    fetch(`${base}/api/agent-gateway/invoke/?stream=true`, {
      method: 'POST',
      mode: 'cors',
      credentials: 'omit',
      headers: { Authorization: `Bearer ${ns.token}`, 'Content-Type': 'application/json' },
      body: JSON.stringify({ input_value: text }),
    });

  const refresh = () => ns.refresh().catch((e) => {
    throw e.status ? httpFailure(e.status, e.retryAfter) : failure(OFFLINE);
  });

  // Refreshes a token that is about to lapse, then retries once on an expired or
  // unknown token; the same visitor is kept either way.
  const invoke = async (text) => {
    const margin = Math.min(30000, (ns.ttl || 0) * 0.2);
    if (!ns.expiresAt || Date.now() > ns.expiresAt - margin) await refresh();
    let res = await call(text);
    if (res.status === 401) {
      const body = await res.json().catch(() => null);
      const code = body && body.error && body.error.code;
      if (code !== 'visitor_session_expired' && code !== 'invalid_visitor_token') throw failure(UNAVAILABLE);
      await refresh();
      res = await call(text);
    }
    if (!res.ok || !res.body) {
      const body = await res.json().catch(() => null);
      const after = res.headers.get('retry-after') || (body && body.error && body.error.retry_after);
      throw httpFailure(res.status, after);
    }
    return res;
  };

  const finalText = (result) => {
    try {
      const t = result.outputs[0].outputs[0].results.message.text;
      return typeof t === 'string' ? t : '';
    } catch (_) {
      return '';
    }
  };

  // Frames are JSON objects each followed by a blank line; a frame may arrive split
  // across reads. Resolves with the complete reply text once `end` arrives.
  const stream = async (res, bubble) => {
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buf = '';
    let text = '';
    let node = null;
    let outcome = null;
    const show = (chunk) => {
      if (!text) chunk = chunk.replace(/^\s+/, '');
      if (!chunk) return;
      const stick = nearBottom();
      text += chunk;
      if (node) node.appendData(chunk);
      else bubble.append((node = document.createTextNode(chunk)));
      if (stick) toBottom();
    };
    const frame = (raw) => {
      raw = raw.trim();
      if (raw.startsWith('data:')) raw = raw.slice(5).trim();
      if (!raw) return;
      let ev;
      try {
        ev = JSON.parse(raw);
      } catch (_) {
        return;
      }
      const data = (ev && ev.data) || {};
      if (ev.event === 'token' && typeof data.chunk === 'string') show(data.chunk);
      else if (ev.event === 'end') {
        if (!text) show(finalText(data.result));
        outcome = { text };
      } else if (ev.event === 'error') {
        outcome = { error: (typeof data.error === 'string' && data.error.trim()) || UNAVAILABLE };
      }
    };
    try {
      while (!outcome) {
        let chunk;
        try {
          chunk = await reader.read();
        } catch (_) {
          throw failure(navigator.onLine === false ? OFFLINE : UNAVAILABLE);
        }
        if (chunk.done) {
          frame(buf + decoder.decode());
          break;
        }
        buf = (buf + decoder.decode(chunk.value, { stream: true })).replace(/\r\n/g, '\n');
        let i;
        while (!outcome && (i = buf.indexOf('\n\n')) >= 0) {
          frame(buf.slice(0, i));
          buf = buf.slice(i + 2);
        }
      }
    } finally {
      if (outcome) reader.cancel().catch(() => {});
    }
    if (!outcome) throw failure(UNAVAILABLE);
    if (outcome.error) throw failure(outcome.error);
    if (!outcome.text) throw failure(UNAVAILABLE);
    return outcome.text;
  };

  const deliver = async (text) => {
    clearError();
    setBusy(true);
    const bubble = addMessage('assistant', '');
    bubble.dataset.streaming = 'true';
    try {
      const reply = await stream(await invoke(text), bubble);
      bubble.removeAttribute('data-streaming');
      announcer.textContent = reply;
    } catch (e) {
      bubble.remove();
      showError((e && e.friendly) || OFFLINE, text);
    } finally {
      setBusy(false);
    }
  };

  const submit = () => {
    const text = input.value.trim();
    if (!text || busy) return;
    input.value = '';
    resize();
    clearError();
    addMessage('user', text);
    deliver(text);
  };

  input.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      submit();
    }
  });
  input.addEventListener('input', resize);
  sendBtn.addEventListener('click', () => {
    submit();
    input.focus();
  });
  closeBtn.addEventListener('click', close);
  ns.root.addEventListener('keydown', (e) => {
    if (e.key === 'Escape' && isOpen) {
      e.preventDefault();
      close();
    }
  });

  ns.widget = { open, close, toggle: () => (isOpen ? close() : open()) };
})();
