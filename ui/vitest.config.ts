import { svelte } from '@sveltejs/vite-plugin-svelte';
import { defineConfig } from 'vitest/config';

export default defineConfig({
  // The app state (`*.svelte.ts`) uses runes, so tests compile it like the app does,
  // with Svelte's client build (reactive $state/$derived, not the server renderer).
  plugins: [svelte()],
  resolve: { conditions: ['browser'] },
  test: {
    environment: 'node',
    include: ['tests/**/*.test.ts'],
  },
});
