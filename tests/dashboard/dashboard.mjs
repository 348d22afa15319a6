// Drives the dashboard in headless Chromium against a running server, as a user would, and
// prints what the page showed as JSON on its last line; tests/dashboard.rs compares that with
// the API's answers. Screenshots of every view go to $SHOTS.
//
// Environment: BASE (http://127.0.0.1:port), READ_KEY, WRITE_KEY, ADMIN_TOKEN, TENANT_ID,
// FROM and TO (the custom range holding the test's events), STEPS (funnel steps, comma
// separated), SERIES_EVENT, SHOTS (a folder), NODE_ENV_DIR (playwright-core), CHROMIUM.
import { createRequire } from 'node:module'
import fs from 'node:fs'
import path from 'node:path'

const require = createRequire(process.env.NODE_ENV_DIR + '/package.json')
const { chromium } = require('playwright-core')

const env = (name) => {
  const value = process.env[name]
  if (!value) throw new Error(`${name} is not set`)
  return value
}
const base = env('BASE')
const readKey = env('READ_KEY')
const writeKey = env('WRITE_KEY')
const adminToken = env('ADMIN_TOKEN')
const tenantId = env('TENANT_ID')
const from = env('FROM')
const to = env('TO')
const steps = env('STEPS').split(',')
const seriesEvent = env('SERIES_EVENT')
const shots = env('SHOTS')
fs.mkdirSync(shots, { recursive: true })

const out = { screenshots: [], problems: [] }
let rotated = false
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox']
})

/** A fresh browser context (cold cache, empty session storage) with error collection. */
/** Every address the pages asked for, WebSockets included: the keys must be in none. */
const addresses = []

async function openPage (viewport) {
  const context = await browser.newContext({ viewport, acceptDownloads: true })
  const page = await context.newPage()
  page.on('request', (request) => addresses.push(request.url()))
  page.on('websocket', (socket) => addresses.push(socket.url()))
  page.on('pageerror', (error) => out.problems.push(`page error: ${error.message}`))
  page.on('console', (message) => {
    // A refused key's 401 is logged by Chromium as a failed load (the wrong key at sign-in),
    // and, once the key is rotated, as a failed WebSocket: expected in these flows.
    const text = message.text()
    const expected = text.startsWith('Failed to load resource') ||
      (rotated && text.startsWith('WebSocket connection to'))
    if (message.type() === 'error' && !expected) {
      out.problems.push(`console: ${text}`)
    }
  })
  return { context, page }
}

async function shot (page, name) {
  const file = path.join(shots, `${name}.png`)
  await page.screenshot({ path: file, fullPage: true })
  out.screenshots.push(file)
}

/** The rows of the table marked `data-table=name`, as arrays of cell texts. */
async function rows (page, name) {
  const selector = `table[data-table="${name}"] tbody tr`
  await page.waitForSelector(selector)
  return page.$$eval(selector, (trs) => trs
    .filter((tr) => !tr.querySelector('td.empty'))
    .map((tr) => [...tr.querySelectorAll('td')].map((td) => td.textContent.trim())))
}

/** Sets the custom range of the view's range control. */
async function customRange (page) {
  await page.selectOption('select[name=range]', 'custom')
  await page.fill('input[name=from]', from.slice(0, 16))
  await page.fill('input[name=to]', to.slice(0, 16))
}

/** Controls without a label or accessible name in the current view. */
async function unlabelled (page) {
  return page.$$eval('input, select, textarea, button', (nodes) => nodes
    .filter((n) => n.type !== 'hidden' && n.offsetParent !== null)
    .filter((n) => !(n.labels && n.labels.length) && !n.getAttribute('aria-label') && !n.textContent.trim())
    .map((n) => n.outerHTML.slice(0, 80)))
}

async function sendEvents (count, name) {
  const batch = Array.from({ length: count }, (_, i) => ({
    type: 'track', event: name, userId: `live-${i % 5}`, messageId: `live-${name}-${i}-${Date.now()}`
  }))
  const response = await fetch(`${base}/v1/batch`, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json', Authorization: `Bearer ${writeKey}` },
    body: JSON.stringify({ batch })
  })
  if (!response.ok) throw new Error(`sending events: ${response.status} ${await response.text()}`)
}

try {
  // Cold load: page weight of everything the sign-in page and the live view load.
  const { context, page } = await openPage({ width: 1280, height: 900 })
  const loads = []
  page.on('requestfinished', (request) => {
    loads.push(request.sizes().then((sizes) => [new URL(request.url()).pathname, sizes.responseBodySize + sizes.responseHeadersSize]))
  })
  await page.goto(`${base}/`)
  await page.waitForSelector('input[name=read-key]')
  out.unlabelled = await unlabelled(page)
  await shot(page, '1-sign-in')
  // A wrong key is refused with the server's reason, and nothing is kept.
  await page.fill('input[name=read-key]', 'sr_read_0000')
  await page.click('form button[type=submit]')
  out.wrong_key_error = (await page.textContent('.error', { timeout: 5000 })).trim()
  await page.fill('input[name=read-key]', readKey)
  const signInAt = await page.evaluate(() => performance.now())
  await page.click('form button[type=submit]')
  await page.waitForFunction(() => /\d/.test(document.querySelector('[data-metric="events-per-second"]')?.textContent ?? ''))
  out.first_live_number_ms = await page.evaluate(() => performance.getEntriesByName('statsremote:first-live-number')[0].startTime)
  out.sign_in_to_first_live_number_ms = out.first_live_number_ms - signInAt
  await page.waitForTimeout(300)
  const loaded = await Promise.all([...loads])
  out.page_weight_bytes = loaded.reduce((sum, [, size]) => sum + size, 0)
  out.page_files = loaded.map(([name]) => name)
  out.unlabelled.push(...await unlabelled(page))

  // Live numbers move after events are sent: the second's count, the minute's total and the
  // minute's top events, each read at one moment on the page.
  const read = () => page.evaluate(() => {
    const value = (name) => Number(document.querySelector(`[data-metric="${name}"]`).textContent.replace(/,/g, ''))
    const row = [...document.querySelectorAll('table[data-table="live-top"] tbody tr')]
      .map((tr) => [...tr.querySelectorAll('td')].map((td) => td.textContent))
      .find((cells) => cells[0] === 'Live Clicked')
    return { second: value('events-per-second'), minute: value('events-this-minute'), row }
  })
  const before = await read()
  await sendEvents(25, 'Live Clicked')
  const sentAt = Date.now()
  let seen = await read()
  let maxSecond = 0
  while (!seen.row && Date.now() - sentAt < 10_000) {
    await page.waitForTimeout(50)
    seen = await read()
    maxSecond = Math.max(maxSecond, seen.second)
  }
  out.live_seen_after_ms = Date.now() - sentAt
  // The second the events arrived in is shown for a second after the row appears.
  for (let i = 0; i < 30 && maxSecond < 25; i++) {
    await page.waitForTimeout(50)
    maxSecond = Math.max(maxSecond, (await read()).second)
  }
  out.live = { before, seen, max_events_per_second: maxSecond }
  await shot(page, '2-live')

  // Keyboard: from the brand link at the top, Tab reaches the Series link, and Enter opens it.
  await page.focus('a.brand')
  let reached = false
  for (let i = 0; i < 20 && !reached; i++) {
    await page.keyboard.press('Tab')
    reached = await page.evaluate(() => document.activeElement?.textContent === 'Series')
  }
  out.keyboard_focus = await page.evaluate(() => document.activeElement?.outerHTML.slice(0, 80))
  if (reached) await page.keyboard.press('Enter')
  await page.waitForTimeout(100)
  out.keyboard_reached_series = reached && page.url().includes('#/series')

  // Series: one event by hour over the custom range, table and CSV.
  await page.goto(`${base}/#/series`)
  await page.waitForSelector('input[name=event]')
  await page.fill('input[name=event]', seriesEvent)
  await page.selectOption('select[name=metric]', 'count')
  await customRange(page)
  await page.selectOption('select[name=interval]', 'hour')
  await page.click('form button[type=submit]')
  await page.waitForFunction(() => document.querySelector('table[data-table="series"] caption')?.textContent.includes('per hour'))
  out.series = await rows(page, 'series')
  out.unlabelled.push(...await unlabelled(page))
  await shot(page, '3-series')
  const [download] = await Promise.all([page.waitForEvent('download'), page.click('text=Download CSV')])
  out.series_csv = fs.readFileSync(await download.path(), 'utf8').trim().split(/\r?\n/)
  // A range the API refuses is explained, not drawn.
  await page.selectOption('select[name=interval]', 'minute')
  await page.fill('input[name=from]', '2025-01-01T00:00')
  await page.click('form button[type=submit]')
  out.series_refused = (await page.textContent('.error', { timeout: 5000 })).trim()

  // Top events over the range.
  await page.goto(`${base}/#/top`)
  await page.waitForSelector('select[name=range]')
  await customRange(page)
  await page.click('form button[type=submit]')
  await page.waitForFunction(() => document.querySelectorAll('table[data-table="top"] td a').length > 0)
  out.top = await rows(page, 'top')
  await shot(page, '4-top-events')

  // Funnel builder.
  await page.goto(`${base}/#/funnel`)
  await page.waitForSelector('input[name=step]')
  while ((await page.$$('input[name=step]')).length < steps.length) await page.click('text=Add a step')
  const inputs = await page.$$('input[name=step]')
  for (let i = 0; i < steps.length; i++) await inputs[i].fill(steps[i])
  await page.selectOption('select[name=window]', '1d')
  await customRange(page)
  await page.click('form.funnel-form button[type=submit]')
  await page.waitForSelector('table[data-table="funnel"]')
  out.funnel = await rows(page, 'funnel')
  out.unlabelled.push(...await unlabelled(page))
  await shot(page, '5-funnel')

  // Read-only views.
  for (const [hash, table, name] of [['segments', 'segments', '6-segments'], ['deadletters', 'deadletters', '7-dead-letters'], ['schemas', 'schemas', '8-schemas']]) {
    await page.goto(`${base}/#/${hash}`)
    await page.waitForSelector(`table[data-table="${table}"], .error`)
    out[hash] = await page.$(`table[data-table="${table}"]`) ? await rows(page, table) : [(await page.textContent('.error')).trim()]
    await shot(page, name)
  }

  // Admin: sign in with the token, create a tenant, change a setting, rotate the read key.
  await page.goto(`${base}/#/admin`)
  await page.fill('input[name=admin-token]', adminToken)
  await page.click('form button[type=submit]')
  await page.waitForSelector('table[data-table="tenants"] tbody tr')
  await page.fill('input[name=name]', 'made-in-the-dashboard')
  await page.click('text=Create tenant')
  await page.waitForSelector('code[data-key="read"]')
  out.created_read_key = await page.textContent('code[data-key="read"]')
  await page.waitForFunction(() => document.querySelector('table[data-table="tenants"]')?.textContent.includes('made-in-the-dashboard'))
  out.tenants = await rows(page, 'tenants')
  await shot(page, '9-admin')
  const row = page.locator('table[data-table="tenants"] tbody tr', { has: page.locator(`code:text-is("${tenantId}")`) })
  await row.locator('button', { hasText: 'Settings' }).click()
  await page.fill('input[name=max_event_names]', '500')
  await page.fill('textarea[name=sampling]', '{"default": 0.5}')
  await page.click('text=Save settings')
  await page.waitForSelector('.panel .ok')
  out.settings_saved = (await page.textContent('.panel .ok')).trim()
  const stored = await (await fetch(`${base}/admin/v1/tenants/${tenantId}`, { headers: { Authorization: `Bearer ${adminToken}` } })).json()
  out.sampling_after_save = stored.settings.sampling
  await shot(page, '10-admin-settings')
  // Emptying the JSON setting turns it off.
  await page.fill('textarea[name=sampling]', '')
  await page.click('text=Save settings')
  await page.waitForFunction(() => document.querySelector('.panel .ok')?.textContent === 'Saved: sampling.')
  out.sampling_shown_after_clearing = await page.inputValue('textarea[name=sampling]')
  // A number field with text in it is refused on the page, naming the setting.
  await page.fill('input[name=rate_limit_burst]', '')
  await page.click('text=Save settings')
  out.settings_refused = (await page.textContent('.panel .error', { timeout: 5000 })).trim()
  await row.locator('button', { hasText: 'Rotate keys' }).click()
  await page.selectOption('select[name=which]', 'read')
  rotated = true
  await page.click('text=Rotate now')
  await page.waitForSelector('code[data-key="read"]')
  out.new_read_key = (await page.textContent('code[data-key="read"]')).trim()
  await shot(page, '11-admin-rotated')
  // The old key, still in this tab's session, is now refused by the live view.
  await page.goto(`${base}/#/live`)
  await page.waitForSelector('.connection[data-state="refused"]', { timeout: 15_000 })
  out.live_after_rotation = (await page.textContent('.connection')).trim()
  await context.close()

  // A phone-sized screen: one column, a menu button, nothing wider than the screen.
  const phone = await openPage({ width: 390, height: 844 })
  await phone.page.goto(`${base}/`)
  await phone.page.fill('input[name=read-key]', out.new_read_key)
  await phone.page.click('form button[type=submit]')
  await phone.page.waitForFunction(() => /\d/.test(document.querySelector('[data-metric="events-per-second"]')?.textContent ?? ''))
  out.phone_overflow_px = await phone.page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth)
  await shot(phone.page, '12-phone-live')
  await phone.page.click('#menu')
  out.phone_menu_links = await phone.page.$$eval('#nav.open a', (links) => links.map((a) => a.textContent))
  await shot(phone.page, '13-phone-menu')
  await phone.context.close()
  out.addresses_with_a_key = addresses.filter((address) =>
    [readKey, writeKey, adminToken, out.new_read_key, out.created_read_key].some((key) => key && address.includes(key)))
} catch (error) {
  out.problems.push(`failed: ${error.stack || error}`)
} finally {
  await browser.close()
}
console.log(JSON.stringify(out))
