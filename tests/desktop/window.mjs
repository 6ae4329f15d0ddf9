// The real desktop window (Tauri + WebKitGTK) driven over WebDriver by tauri-driver:
// launch → pick the model → load the sample data → start training → the loss chart
// shows real points → stop. Run by scripts/desktop-e2e.sh under Xvfb; screenshots go
// to $BACKPROP_ARTIFACTS.
import fs from 'node:fs';
import path from 'node:path';
import { WebDriver } from './webdriver.mjs';

const [app, model, data] = process.argv.slice(2);
if (!app || !model || !data) {
  console.error('usage: node tests/desktop/window.mjs <app binary> <model folder> <data.jsonl>');
  process.exit(2);
}
const artifacts = process.env.BACKPROP_ARTIFACTS ?? 'target/desktop';
fs.mkdirSync(artifacts, { recursive: true });

const wd = new WebDriver(process.env.WEBDRIVER_URL ?? 'http://127.0.0.1:4444');
const shot = async (name) =>
  fs.writeFileSync(path.join(artifacts, `${name}.png`), await wd.screenshot());
const number = async (el, attr) => Number((await wd.attr(el, attr)) ?? 0);

let failed = false;
try {
  await wd.start(app);
  // The app comes up on the Model screen.
  await wd.waitFor('nav-model');
  await shot('01-launch');

  await wd.type('model-input', model);
  await wd.click('model-inspect');
  const arch = await wd.waitFor('model-arch');
  const archText = await wd.content(arch);
  if (!/ForCausalLM/.test(archText)) throw new Error(`model architecture shows ${archText}`);

  await wd.click('nav-data');
  // Enter submits the path form; WebDriver's key code for Enter is U+E007.
  await wd.type('data-path', `${data}\uE007`);
  await wd.waitFor('stat-samples', async (el) => (await wd.content(el)) === '200');
  await shot('02-data');

  await wd.click('nav-train');
  await wd.type('cfg-steps', '300');
  await wd.type('cfg-batch', '2');
  await wd.type('cfg-seq', '128');
  await wd.click('train-start');
  const chart = await wd.waitFor('loss-chart', async (el) => (await number(el, 'data-points')) >= 3, 300_000);
  const points = await number(chart, 'data-points');
  await shot('03-training');
  await wd.click('train-stop');
  await wd.waitFor('train-status', async (el) =>
    ['stopped', 'finished'].includes(await wd.attr(el, 'data-status')),
  );
  await shot('04-stopped');
  console.log(`desktop: the loss chart had ${points} points while training; stopped cleanly`);
} catch (e) {
  failed = true;
  console.error(`desktop test failed: ${e.message}`);
  await shot('failure').catch(() => {});
} finally {
  await wd.end();
}
process.exit(failed ? 1 : 0);
