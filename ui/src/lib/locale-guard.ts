// Imported first by main.ts, before any library reads the locale. WebKitGTK reports the
// POSIX locale "C" as navigator.language when the desktop session has LANG=C or no
// LANG at all; Intl rejects that tag with a RangeError, and chart libraries that format
// numbers with navigator.language at load time would stop the whole app from starting.
import { pickLocale } from './format';

if (typeof navigator !== 'undefined') {
  const usable = pickLocale([navigator.language, ...(navigator.languages ?? [])]);
  if (usable !== navigator.language) {
    Object.defineProperty(navigator, 'language', { value: usable, configurable: true });
    Object.defineProperty(navigator, 'languages', { value: [usable], configurable: true });
  }
}
