import { defineConfig } from 'vite';
import { svelte } from '@sveltejs/vite-plugin-svelte';

// `backprop serve` listens on 7860; the dev server forwards the API (and the SSE stream)
// there so the UI can be worked on with hot reload against a real engine. Without a
// token the server answers only its own Host and Origin: the proxy rewrites Host, and
// the page's origin must be allowed with `backprop serve --allow-origin http://localhost:5173`.
const api = process.env.BACKPROP_API ?? 'http://127.0.0.1:7860';

export default defineConfig({
  plugins: [svelte()],
  // Relative asset URLs: the same build is served by axum at / and loaded by Tauri.
  base: './',
  server: {
    port: 5173,
    proxy: { '/api': { target: api, changeOrigin: true } },
  },
  build: {
    outDir: 'dist',
    target: 'es2022',
  },
});
