// Playwright against a running `backprop serve` (started by scripts/e2e.sh). Debian's
// Chromium is used because Playwright's own browser download cannot work offline.
import path from 'node:path';
import { defineConfig } from '@playwright/test';

const artifacts = path.resolve(process.env.BACKPROP_ARTIFACTS ?? 'target/e2e');

export default defineConfig({
  testDir: '.',
  testMatch: '*.spec.ts',
  // Training, export and an Ollama round trip on CPU: minutes, not seconds.
  timeout: 20 * 60_000,
  expect: { timeout: 30_000 },
  workers: 1,
  retries: 0,
  reporter: [['list']],
  outputDir: path.join(artifacts, 'test-results'),
  use: {
    baseURL: process.env.BACKPROP_URL ?? 'http://127.0.0.1:7860',
    viewport: { width: 1360, height: 880 },
    trace: 'retain-on-failure',
    screenshot: 'only-on-failure',
    launchOptions: {
      executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
      args: [
        '--no-sandbox',
        '--disable-gpu',
        '--disable-background-networking',
        '--disable-component-update',
        '--disable-sync',
        '--no-first-run',
      ],
    },
  },
});
