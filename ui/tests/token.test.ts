import { afterEach, describe, expect, it, vi } from 'vitest';
import { takeToken } from '../src/api/index';

function memoryStorage(): Storage {
  const m = new Map<string, string>();
  return {
    getItem: (k) => m.get(k) ?? null,
    setItem: (k, v) => void m.set(k, v),
    removeItem: (k) => void m.delete(k),
    clear: () => m.clear(),
    key: (i) => [...m.keys()][i] ?? null,
    get length() {
      return m.size;
    },
  };
}

const loc = (hash: string) => ({ hash, pathname: '/', search: '' }) as Location;

describe('takeToken', () => {
  afterEach(() => vi.unstubAllGlobals());

  it('takes #token= from the address, stores it and clears it from the address bar', () => {
    const replaceState = vi.fn();
    vi.stubGlobal('history', { replaceState });
    const store = memoryStorage();
    expect(takeToken(loc('#token=a%2Fb'), store)).toBe('a/b');
    expect(store.getItem('backprop.token')).toBe('a/b');
    expect(replaceState).toHaveBeenCalledWith(null, '', '/');
  });

  it('falls back to the stored token on reload', () => {
    vi.stubGlobal('history', { replaceState: vi.fn() });
    const store = memoryStorage();
    store.setItem('backprop.token', 'kept');
    expect(takeToken(loc(''), store)).toBe('kept');
    expect(takeToken(loc('#other=1'), memoryStorage())).toBeUndefined();
  });
});
