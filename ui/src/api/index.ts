// Picks the transport: Tauri IPC inside the desktop window, HTTP+SSE on the page's own
// origin otherwise. The server token comes from the address (`#token=...`) once and is
// kept in sessionStorage, so reloads and in-app navigation keep working.

import { HttpBackend } from './http';
import type { Backend } from './backend';

export * from './backend';

const TOKEN_KEY = 'backprop.token';

/** Reads `#token=` from the address into sessionStorage and removes it from the address bar. */
export function takeToken(loc: Location = location, store: Storage = sessionStorage): string | undefined {
  const m = /(?:^#|&)token=([^&]*)/.exec(loc.hash);
  if (m) {
    const token = decodeURIComponent(m[1]);
    store.setItem(TOKEN_KEY, token);
    const rest = loc.hash.replace(/(?:^#|&)token=[^&]*/, '').replace(/^&/, '');
    history.replaceState(null, '', loc.pathname + loc.search + (rest ? `#${rest}` : ''));
    return token;
  }
  return store.getItem(TOKEN_KEY) ?? undefined;
}

export function isTauri(): boolean {
  return typeof window !== 'undefined' && '__TAURI_INTERNALS__' in window;
}

export async function createBackend(): Promise<Backend> {
  if (isTauri()) {
    // Loaded only in the desktop window; the browser bundle never runs Tauri code.
    const { TauriBackend } = await import('./tauri');
    return new TauriBackend();
  }
  return new HttpBackend(location.origin, takeToken());
}
