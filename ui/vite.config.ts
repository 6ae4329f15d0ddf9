import { defineConfig } from 'vite';
import { svelte } from '@sveltejs/vite-plugin-svelte';

// `backprop serve` listens on 7860; the dev server forwards the API (and the SSE stream)
// there so the UI can be worked on with hot reload against a real engine.
const api = process.env.BACKPROP_API ?? 'http://127.0.0.1:7860';

export default defineConfig({
  plugins: [svelte()],
  // Relative asset URLs: the same build is served by axum at / and loaded by Tauri.
  base: './',
  server: {
    port: 5173,
    proxy: { '/api': { target: api } },
  },
  build: {
    outDir: 'dist',
    target: 'es2022',
  },
});
