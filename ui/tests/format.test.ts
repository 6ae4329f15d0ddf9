import { describe, expect, it } from 'vitest';
import { pickLocale } from '../src/lib/format';

describe('pickLocale', () => {
  it('skips the POSIX "C" locale WebKitGTK reports under LANG=C', () => {
    expect(() => new Intl.DateTimeFormat('C')).toThrow(RangeError);
    expect(pickLocale(['C', 'de-DE'])).toBe('de-DE');
    expect(pickLocale(['C'])).toBe('en-US');
    expect(pickLocale([undefined, 'fr'])).toBe('fr');
  });
});
