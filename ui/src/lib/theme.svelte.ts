// Light/dark theme: follows the OS until the user picks one; the pick is kept in
// localStorage and applied as `data-theme` on <html>, which the CSS variables key on.

export type ThemePref = 'system' | 'light' | 'dark';
const KEY = 'backprop.theme';

function readPref(): ThemePref {
  try {
    const v = localStorage.getItem(KEY);
    return v === 'light' || v === 'dark' ? v : 'system';
  } catch {
    return 'system';
  }
}

const media = typeof matchMedia === 'function' ? matchMedia('(prefers-color-scheme: dark)') : null;

class Theme {
  pref = $state<ThemePref>(readPref());
  systemDark = $state(media?.matches ?? false);
  resolved = $derived<'light' | 'dark'>(
    this.pref === 'system' ? (this.systemDark ? 'dark' : 'light') : this.pref,
  );

  constructor() {
    media?.addEventListener('change', (e) => (this.systemDark = e.matches));
  }

  set(pref: ThemePref): void {
    this.pref = pref;
    try {
      if (pref === 'system') localStorage.removeItem(KEY);
      else localStorage.setItem(KEY, pref);
    } catch {
      // storage refused (private mode): the choice lasts for this page only
    }
  }

  /** Toggles to the opposite of what is shown now. */
  toggle(): void {
    this.set(this.resolved === 'dark' ? 'light' : 'dark');
  }

  apply(): void {
    document.documentElement.dataset.theme = this.resolved;
  }
}

export const theme = new Theme();
