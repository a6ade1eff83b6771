// The web dashboard in a real headless browser (Debian's chromium, driven by playwright-core):
// the page must list the daemons, all up; a job run from its form must be drawn reaching
// `completed` with its output CID, whose first part must download through the gateway. Saves
// a screenshot and prints the events latency (a task finishing at its coordinator to the page
// showing it) as JSON.
//
//   node dashboard.mjs http://127.0.0.1:5001 DAEMONS INPUT_CID REDUCERS SCREENSHOT.png [REFUSED_PEER]
import { chromium } from 'playwright-core'
import { mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

const [url, daemons, input, reducers, screenshot, refused] = process.argv.slice(2)
const profile = await mkdtemp(join(tmpdir(), 'p2pmr-chromium-'))
const browser = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  chromiumSandbox: false,
  viewport: { width: 1280, height: 900 },
  // Without these the browser reaches for the network, which these machines do not have.
  args: ['--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
    '--disable-component-update', '--disable-sync'],
})
const fail = (what) => { throw new Error(`dashboard: ${what}`) }

// Milliseconds from each task_finished event's recording to this process reading it from the
// NDJSON stream; events recorded before the stream was opened are left out.
async function readDirect (api, job) {
  const opened = Date.now()
  const r = await fetch(`${api}/api/v0/mr/events?arg=${job}`, { method: 'POST' })
  const out = []
  let buffered = ''
  for await (const chunk of r.body.pipeThrough(new TextDecoderStream())) {
    const now = Date.now()
    buffered += chunk
    const lines = buffered.split('\n')
    buffered = lines.pop()
    for (const line of lines.filter((l) => l.trim())) {
      const e = JSON.parse(line)
      if (e.event === 'task_finished' && e.at >= opened) out.push(now - e.at)
    }
  }
  return out
}

function summary (values) {
  const sorted = [...values].sort((a, b) => a - b)
  const pick = (q) => sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))]
  return { events: sorted.length, median: pick(0.5), p90: pick(0.9), max: sorted.at(-1) }
}
try {
  const page = browser.pages()[0] ?? await browser.newPage()
  const errors = []
  page.on('pageerror', (e) => errors.push(e.message))
  page.on('console', (m) => { if (m.type() === 'error') errors.push(m.text()) })
  await page.goto(url + '/')

  const up = `#daemons tr.daemon[data-up="true"]`
  await page.waitForFunction((n) => document.querySelectorAll(`#daemons tr.daemon[data-up="true"]`).length === n,
    Number(daemons), { timeout: 30_000 }).catch(() => {})
  const listed = await page.locator('#daemons tr.daemon').count()
  const upCount = await page.locator(up).count()
  if (listed !== Number(daemons) || upCount !== Number(daemons)) {
    fail(`lists ${listed} daemons, ${upCount} up; expected ${daemons} up`)
  }

  if (refused) {
    // The daemons are polled every 2 s: the refusal shows on the next poll.
    const turnedAway = page.locator(`#refusal-list li.refusal[data-peer="${refused}"]`)
    await turnedAway.first().waitFor({ timeout: 10_000 }).catch(() => {})
    if (await turnedAway.count() === 0) fail(`does not show ${refused} turned away`)
  }

  await page.selectOption('#run select[name=job]', 'wordcount')
  await page.fill('#run input[name=input]', input)
  await page.fill('#run input[name=reducers]', reducers)
  await page.click('#run button[type=submit]')
  await page.waitForFunction(() => /^job /.test(document.getElementById('run-result').textContent),
    null, { timeout: 30_000 }).catch(() => {})
  const submitted = (await page.textContent('#run-result')).trim()
  if (!submitted.startsWith('job ')) fail(`the run form answered "${submitted}"`)
  const job = submitted.slice(4)
  // The baseline: the same events read here, by a plain client of the same stream.
  const direct = readDirect(url, job)

  const card = page.locator(`.job[data-job="${job}"]`)
  await card.and(page.locator('[data-state="completed"]')).waitFor({ timeout: 180_000 })
  const output = (await card.locator('a.output').textContent()).trim()
  const maps = (await card.locator('[data-progress=map]').textContent()).trim()
  const reduces = (await card.locator('[data-progress=reduce]').textContent()).trim()
  const [done, total] = reduces.split(' / ').map(Number)
  if (done !== total || total !== Number(reducers)) fail(`reduce progress reads ${reduces}`)
  const lanes = await card.locator('.lane').count()
  if (lanes < 1) fail('no task timeline was drawn')

  const part = await page.evaluate(async (href) => {
    const r = await fetch(href)
    return { status: r.status, bytes: (await r.arrayBuffer()).byteLength }
  }, await card.locator('a[download="part-00000"]').getAttribute('href'))
  if (part.status !== 200 || part.bytes === 0) fail(`part-00000 through the gateway: ${JSON.stringify(part)}`)

  // The last events may still be waiting for their frame.
  await page.waitForTimeout(200)
  const latencies = await page.evaluate(() => window.p2pmrLatencies)
  const baseline = await direct
  await page.screenshot({ path: screenshot, fullPage: true })
  if (errors.length) fail(`the page reported errors: ${errors.join('; ')}`)
  console.log(JSON.stringify({
    job, output, maps, reduces, lanes, part0_bytes: part.bytes,
    latency_ms: { browser: summary(latencies), stream: summary(baseline) },
  }))
} finally {
  await browser.close()
  await rm(profile, { recursive: true, force: true })
}
