// A few WebDriver calls over plain HTTP (W3C protocol), enough to drive the desktop
// window through tauri-driver → WebKitWebDriver without a client library.

export class WebDriver {
  constructor(base) {
    this.base = base;
    this.session = null;
  }

  async call(method, path, body, timeoutMs = 120_000) {
    const res = await fetch(`${this.base}${path}`, {
      method,
      headers: { 'content-type': 'application/json' },
      body: body === undefined ? undefined : JSON.stringify(body),
      signal: AbortSignal.timeout(timeoutMs),
    });
    const json = await res.json().catch(() => ({}));
    if (!res.ok) {
      const v = json.value ?? {};
      throw new Error(`${method} ${path}: ${res.status} ${v.error ?? ''} ${v.message ?? ''}`);
    }
    return json.value;
  }

  /** Opens a session (launches the app). WebKitWebDriver on a loaded 2-core CI machine
   * has been seen to never answer a session request (once in many runs, the app never
   * started); such a request is abandoned after 90 s and made again, up to 3 times. */
  async start(application, env) {
    const caps = { 'tauri:options': { application, ...(env ? { env } : {}) }, browserName: 'wry' };
    let last;
    for (let attempt = 1; attempt <= 3; attempt++) {
      try {
        const v = await this.call('POST', '/session', { capabilities: { alwaysMatch: caps } }, 90_000);
        this.session = v.sessionId;
        return;
      } catch (e) {
        last = e;
        console.error(`desktop: session request ${attempt} failed (${e.message}); retrying`);
      }
    }
    throw new Error(`no WebDriver session after 3 attempts: ${last.message}`);
  }

  s(path) {
    return `/session/${this.session}${path}`;
  }

  async find(testid) {
    const v = await this.call('POST', this.s('/element'), {
      using: 'css selector',
      value: `[data-testid="${testid}"]`,
    });
    return Object.values(v)[0];
  }

  /** Waits until `testid` exists (and `pred` holds for it). */
  async waitFor(testid, pred = async () => true, timeoutMs = 120_000) {
    const deadline = Date.now() + timeoutMs;
    let last;
    while (Date.now() < deadline) {
      try {
        const el = await this.find(testid);
        if (await pred(el)) return el;
      } catch (e) {
        last = e;
      }
      await new Promise((r) => setTimeout(r, 250));
    }
    throw new Error(`timed out waiting for ${testid}${last ? `: ${last.message}` : ''}`);
  }

  async click(testid) {
    const el = await this.waitFor(testid);
    await this.call('POST', this.s(`/element/${el}/click`), {});
  }

  async type(testid, text) {
    const el = await this.waitFor(testid);
    await this.call('POST', this.s(`/element/${el}/clear`), {});
    await this.call('POST', this.s(`/element/${el}/value`), { text });
  }

  async attr(el, name) {
    return this.call('GET', this.s(`/element/${el}/attribute/${name}`));
  }

  async text(el) {
    return this.call('GET', this.s(`/element/${el}/text`));
  }

  /** The element's textContent, trimmed (WebKitWebDriver's element text can differ). */
  async content(el) {
    const v = await this.call('POST', this.s('/execute/sync'), {
      script: 'return arguments[0].textContent',
      args: [{ 'element-6066-11e4-a52e-4f735466cecf': el }],
    });
    return String(v ?? '').trim();
  }

  async screenshot() {
    return Buffer.from(await this.call('GET', this.s('/screenshot')), 'base64');
  }

  async end() {
    if (this.session) await this.call('DELETE', this.s('')).catch(() => {});
  }
}
