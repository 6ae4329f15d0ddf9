// The whole app in a browser, as a person would use it: choose the fixture model, drop
// the sample data on the window, train, stop, resume, export GGUF, send it to Ollama
// and chat with it. Screenshots of every screen go to $BACKPROP_ARTIFACTS.
import fs from 'node:fs';
import path from 'node:path';
import { expect, test, type Locator, type Page } from '@playwright/test';

function env(name: string): string {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set; run the end-to-end tests with scripts/e2e.sh`);
  return v;
}

const artifacts = path.resolve(process.env.BACKPROP_ARTIFACTS ?? 'target/e2e');
fs.mkdirSync(artifacts, { recursive: true });

/** A screenshot of the whole screen: the window grows to the height of the scrolled content. */
async function shot(page: Page, name: string) {
  const size = page.viewportSize()!;
  const height = await page.evaluate(() => {
    const main = document.querySelector('main')!;
    return main.scrollHeight + main.getBoundingClientRect().top;
  });
  await page.setViewportSize({ width: size.width, height: Math.max(size.height, Math.ceil(height)) });
  await page.waitForTimeout(100); // a frame for charts to take the new size
  await page.screenshot({ path: path.join(artifacts, `${name}.png`) });
  await page.setViewportSize(size);
}

async function points(chart: Locator): Promise<number> {
  return Number((await chart.getAttribute('data-points')) ?? 0);
}

/**
 * Waits for the Train screen's run to reach `want`, failing at once with the message
 * the UI shows if a call or the run fails instead of waiting out the timeout.
 */
async function waitForRun(page: Page, want: string, timeout: number) {
  await expect
    .poll(
      async () => {
        const err = page.getByTestId('train-error');
        if (await err.count()) throw new Error(`the UI shows an error: ${await err.innerText()}`);
        return page.getByTestId('train-status').getAttribute('data-status');
      },
      { timeout, intervals: [250] },
    )
    .toBe(want);
}

test('model → data → train, stop, resume → export → Ollama → chat', async ({ page }) => {
  const model = env('FIXTURE_MODEL');
  const sample = env('SAMPLE_DATA');
  const ollamaName = env('OLLAMA_NAME');
  const errors: string[] = [];
  page.on('pageerror', (e) => errors.push(e.message));

  const token = process.env.BACKPROP_TOKEN;
  await page.goto(token ? `/#token=${encodeURIComponent(token)}` : '/');

  // Model
  await expect(page.getByTestId('nav-model')).toHaveAttribute('aria-current', 'page');
  await page.getByTestId('model-input').fill(model);
  await page.getByTestId('model-inspect').click();
  await expect(page.getByTestId('model-info')).toBeVisible({ timeout: 120_000 });
  await expect(page.getByTestId('model-arch')).toHaveText(/ForCausalLM/);
  await shot(page, '01-model');

  // Data: a real drop event on the window, carrying the file's contents.
  await page.getByTestId('nav-data').click();
  const dataTransfer = await page.evaluateHandle(
    ({ text, name }) => {
      const dt = new DataTransfer();
      dt.items.add(new File([text], name, { type: 'application/jsonl' }));
      return dt;
    },
    { text: fs.readFileSync(sample, 'utf8'), name: path.basename(sample) },
  );
  await page.dispatchEvent('main', 'dragenter', { dataTransfer });
  await expect(page.getByTestId('drop-overlay')).toBeVisible();
  await page.dispatchEvent('main', 'drop', { dataTransfer });
  await expect(page.getByTestId('drop-overlay')).toBeHidden();
  await expect(page.getByTestId('data-ok')).toBeVisible({ timeout: 120_000 });
  await expect(page.getByTestId('stat-samples')).toHaveText('200');
  await expect(page.getByTestId('data-format')).toHaveText(/Alpaca/);
  await expect(page.getByTestId('data-samples').locator('pre').first()).not.toBeEmpty();
  await shot(page, '02-data');

  // Train
  await page.getByTestId('nav-train').click();
  await page.getByTestId('cfg-steps').fill('300');
  await page.getByTestId('cfg-batch').fill('2');
  await page.getByTestId('cfg-seq').fill('128');
  await page.getByTestId('cfg-ckpt').fill('5');
  await page.locator('summary', { hasText: 'Advanced' }).click();
  await page.getByTestId('cfg-tensorboard').check();
  // The plan before Start: 300 steps of 2 rows over the ~200 usable samples (a few
  // have no target left within 128 tokens) is about 3 epochs.
  await page.getByTestId('plan-button').click();
  await expect(page.getByTestId('plan-epochs')).toHaveText(/^300 × 2 rows = 3\.\d epochs$/, { timeout: 60_000 });
  await expect(page.getByTestId('plan-memory')).toContainText('free');
  await expect(page.getByTestId('plan-checkpointing')).toContainText('layers recomputed');
  await page.getByTestId('train-start').click();
  await waitForRun(page, 'running', 60_000);
  const loss = page.getByTestId('loss-chart');
  await expect.poll(() => points(loss), { timeout: 5 * 60_000, intervals: [250] }).toBeGreaterThanOrEqual(3);
  const runId = ((await page.getByTestId('live-run').textContent()) ?? '').trim();
  expect(runId).not.toBe('');
  await shot(page, '03-train-running');

  await page.getByTestId('train-stop').click();
  await waitForRun(page, 'stopped', 120_000);
  const stoppedAt = await points(loss);
  expect(stoppedAt).toBeGreaterThanOrEqual(3);
  expect(stoppedAt).toBeLessThan(300);
  await shot(page, '04-train-stopped');

  await page.getByTestId('train-resume').click();
  await waitForRun(page, 'finished', 10 * 60_000);
  // One point per step of the run, the ones before the stop included.
  await expect.poll(() => points(loss)).toBe(300);
  await expect(page.getByTestId('train-step')).toHaveText(/^300/);
  await expect(page.getByTestId('live-run')).toHaveText(runId);
  await shot(page, '05-train-finished');
  // Tracking from the form: one TensorBoard event file per session (before the stop,
  // and the resume).
  const tensorboard = path.join(env('BACKPROP_HOME'), 'runs', runId, 'tensorboard');
  expect(fs.readdirSync(tensorboard).filter((f) => f.startsWith('events.out.tfevents.')).length).toBe(2);

  // Runs
  await page.getByTestId('nav-runs').click();
  const row = page.locator(`[data-testid="run-row"][data-run="${runId}"]`);
  await expect(row).toBeVisible();
  await expect(row.locator('[data-status]')).toHaveAttribute('data-status', 'finished');
  await row.getByTestId('run-open').click();
  await expect(page.getByTestId('run-detail')).toBeVisible();
  await expect.poll(() => points(page.getByTestId('detail-chart'))).toBe(300);
  await row.getByTestId('run-compare').check();
  await expect.poll(() => points(page.getByTestId('compare-chart'))).toBe(300);
  await shot(page, '06-runs');

  // Export
  await page.getByTestId('nav-export').click();
  await page.getByTestId('export-run').selectOption(runId);
  await page.getByTestId('export-format-gguf').check();
  await page.getByTestId('export-quant').selectOption('q8_0');
  await page.getByTestId('export-start').click();
  await expect(page.getByTestId('export-job')).toHaveAttribute('data-state', 'finished', { timeout: 10 * 60_000 });
  await expect(page.getByTestId('export-job')).toContainText('q8_0');

  // Ollama
  await expect(page.getByTestId('ollama-running')).toBeVisible();
  await page.getByTestId('push-name').fill(ollamaName);
  await page.getByTestId('push-overwrite').check();
  await page.getByTestId('push-start').click();
  await expect(page.getByTestId('push-job')).toHaveAttribute('data-state', 'finished', { timeout: 10 * 60_000 });
  // Ollama lists a name without a tag as `name:latest`.
  const listed = page.locator('[data-testid="ollama-model"]').filter({ has: page.getByText(ollamaName, { exact: false }) });
  await expect(listed.first()).toBeVisible({ timeout: 60_000 });
  await listed.first().getByRole('button', { name: /^Chat with/ }).click();
  await expect(page.getByTestId('chat-model')).toHaveValue(new RegExp(`^${ollamaName.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}`));

  await page.getByTestId('chat-input').fill('How do I know when pasta is cooked al dente?');
  await page.getByTestId('chat-send').click();
  await expect(page.getByTestId('chat-user')).toHaveCount(1);
  // A barely trained fixture model may well answer nothing; the round trip is what counts.
  await expect(page.getByTestId('chat-reply')).toHaveCount(1, { timeout: 5 * 60_000 });
  await expect(page.getByTestId('chat-error')).toHaveCount(0);
  await shot(page, '07-export-ollama');

  // The other theme, for the screenshots.
  await page.getByTestId('theme-toggle').click();
  await shot(page, '08-export-ollama-other-theme');
  await page.getByTestId('nav-train').click();
  await shot(page, '09-train-other-theme');

  expect(errors, 'uncaught errors in the page').toEqual([]);
});

test('a model by Hugging Face repo id: download with progress, then inspect', async ({ page }) => {
  const repo = env('FIXTURE_REPO');
  await page.goto('/');
  await page.getByTestId('model-input').fill(repo);
  await page.getByTestId('model-download').click();
  const progress = page.getByTestId('model-download-progress');
  await expect(progress).toBeVisible();
  await expect(progress).toHaveAttribute('data-state', 'finished', { timeout: 120_000 });
  await expect(page.getByTestId('model-info')).toBeVisible({ timeout: 60_000 });
  await expect(page.getByTestId('model-arch')).toHaveText(/ForCausalLM/);
  await shot(page, '10-model-download');
});
