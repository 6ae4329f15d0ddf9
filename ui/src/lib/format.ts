// Number, size, time and path formatting shared by the screens.

export function fmtInt(n: number | null | undefined): string {
  return n == null ? '–' : Math.round(n).toLocaleString('en-US');
}

/** Loss-like values: 4 significant digits. */
export function fmtLoss(n: number | null | undefined): string {
  if (n == null || !Number.isFinite(n)) return '–';
  return n >= 100 ? n.toFixed(1) : n.toPrecision(4);
}

/** Learning rates: 2.0e-4. */
export function fmtLr(n: number | null | undefined): string {
  if (n == null || !Number.isFinite(n)) return '–';
  if (n === 0) return '0';
  return n.toExponential(1).replace('e+', 'e');
}

export function fmtParams(n: number): string {
  if (n >= 1e9) return `${(n / 1e9).toFixed(n >= 1e10 ? 0 : 1)}B`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(n >= 1e8 ? 0 : 1)}M`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)}K`;
  return String(n);
}

export function fmtBytes(n: number | null | undefined): string {
  if (n == null) return '–';
  const units = ['B', 'KB', 'MB', 'GB', 'TB'];
  let v = n;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return `${u === 0 ? v : v.toFixed(v >= 100 ? 0 : 1)} ${units[u]}`;
}

export function fmtMb(mb: number): string {
  return mb >= 1024 ? `${(mb / 1024).toFixed(1)} GB` : `${Math.round(mb)} MB`;
}

/** Durations as people say them: 42s, 3m 05s, 1h 02m. */
export function fmtDuration(s: number | null | undefined): string {
  if (s == null || !Number.isFinite(s) || s < 0) return '–';
  const t = Math.round(s);
  if (t < 60) return `${t}s`;
  const m = Math.floor(t / 60);
  if (m < 60) return `${m}m ${String(t % 60).padStart(2, '0')}s`;
  const h = Math.floor(m / 60);
  return `${h}h ${String(m % 60).padStart(2, '0')}m`;
}

/**
 * The first of `candidates` that Intl accepts, else `en-US`. WebKitGTK reports the POSIX
 * locale "C" as the language under LANG=C (and Intl's default follows it), which Intl
 * rejects with a RangeError: formatting with that default would stop the app loading.
 */
export function pickLocale(candidates: readonly (string | undefined)[]): string {
  for (const l of candidates) {
    if (!l) continue;
    try {
      const [canonical] = Intl.getCanonicalLocales(l);
      if (canonical) return canonical;
    } catch {
      // not a BCP 47 tag; try the next one
    }
  }
  return 'en-US';
}

export const LOCALE = pickLocale(
  typeof navigator === 'undefined' ? [] : [navigator.language, ...(navigator.languages ?? [])],
);

const dateFmt = new Intl.DateTimeFormat(LOCALE, {
  year: 'numeric',
  month: 'short',
  day: 'numeric',
  hour: '2-digit',
  minute: '2-digit',
});

/** An ISO timestamp (`2026-11-25T10:15:00Z`) in local time; the raw text if it does not parse. */
export function fmtDate(iso: string): string {
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? iso : dateFmt.format(d);
}

/** Last component of a path, for either separator. */
export function basename(path: string): string {
  const parts = path.split(/[\\/]/).filter(Boolean);
  return parts.length ? parts[parts.length - 1] : path;
}
