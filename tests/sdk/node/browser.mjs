// Sends a known set of events to StatsRemote through an official browser SDK, running in
// headless Chromium on a page this script serves (a different origin from the server's, so CORS
// is exercised as on a real site).
//
// Usage: node browser.mjs <sdk> <host> <key> <run> [faults]
//   sdk: posthog-js, segment (@segment/analytics-next, standard delivery: one request per event
//        to /v1/t, /v1/i, ...) or segment-batching (its batching delivery to /v1/b, keepalive)
//   faults: the server first answers with errors (a proxy): failed requests are expected
//
// Each call type is made once with an anonymous start, then an identify, the first event again
// with the same id (a resend the server must count once), and one event sent with sendBeacon
// (not when faults are expected: a beacon cannot be retried).
// The script waits until no request to the server has been in flight for a while, then prints
// what it saw and, last, the ids it used, as JSON. Console errors, page errors and refused
// requests fail the run unless faults are expected.
import { createRequire } from 'node:module'
import http from 'node:http'
import fs from 'node:fs'

const require = createRequire(process.env.NODE_ENV_DIR + '/package.json')
const { chromium } = require('playwright-core')

const [sdk, host, key, run, faults] = process.argv.slice(2)
const at = '2026-03-01T10:00:00.000Z'

/// The SDK's script, as the page loads it.
async function sdkScript () {
  if (sdk === 'posthog-js') {
    return fs.readFileSync(require.resolve('posthog-js/dist/array.full.js'))
  }
  // analytics-next is published as modules; bundle it once for the page, without its CDN.
  const esbuild = require('esbuild')
  const built = await esbuild.build({
    stdin: {
      contents: "import { AnalyticsBrowser } from '@segment/analytics-next'; window.AnalyticsBrowser = AnalyticsBrowser",
      resolveDir: process.env.NODE_ENV_DIR
    },
    bundle: true,
    format: 'iife',
    platform: 'browser',
    write: false,
    logLevel: 'error',
    define: { 'process.env.NODE_ENV': '"production"' }
  })
  return Buffer.from(built.outputFiles[0].contents)
}

// What the page does, per SDK; runs in the browser and returns the ids it used.
const scenarios = {
  'posthog-js': async ({ host, key, run, at, debug, faults }) => {
    const posthog = window.posthog
    await new Promise((resolve) => posthog.init(key, {
      api_host: host,
      persistence: 'memory',
      autocapture: false,
      capture_pageview: false,
      capture_pageleave: false,
      disable_session_recording: true,
      // posthog-js drops events from browsers it takes for bots, an automated one included;
      // this is its own switch for end-to-end tests.
      opt_out_useragent_filter: true,
      debug,
      loaded: resolve
    }))
    const uuid = (n) => `0190a0e0-0000-7000-8000-${String(n).padStart(12, '0')}`
    const timestamp = new Date(at)
    const ids = { anonymous: posthog.get_distinct_id(), capture: uuid(1), clicked: uuid(2), beacon: uuid(3) }
    posthog.capture('signed_up', { plan: 'pro' }, { uuid: ids.capture, timestamp })
    posthog.identify(`${run}-user`, { email: 'ann@example.com' })
    posthog.capture('clicked', { button: 'buy' }, { uuid: ids.clicked, timestamp })
    posthog.alias(`${run}-alias`)
    posthog.group('company', `${run}-team`, { name: 'Team' })
    // The resend: the same uuid again.
    posthog.capture('signed_up', { plan: 'pro' }, { uuid: ids.capture, timestamp })
    // A beacon gets no answer the SDK could retry on: none while the server is failing.
    if (!faults) posthog.capture('left', {}, { uuid: ids.beacon, timestamp, transport: 'sendBeacon' })
    return ids
  },
  segment: async ({ host, key, run, at, batching, faults }) => {
    const url = new URL(host)
    const settings = { apiKey: key, apiHost: `${url.host}/v1`, protocol: url.protocol.replace(':', '') }
    if (batching) {
      settings.deliveryStrategy = { strategy: 'batching', config: { size: 3, timeout: 200, keepalive: true } }
    }
    // Settings inline: nothing is fetched from Segment's CDN.
    const [analytics] = await window.AnalyticsBrowser.load(
      { writeKey: key, cdnSettings: { integrations: { 'Segment.io': settings } } },
      { disableClientPersistence: true }
    )
    const ids = {}
    for (const call of ['page', 'track', 'alias', 'identify', 'clicked', 'group', 'beacon']) ids[call] = `${run}-${call}`
    const options = (call) => ({ messageId: ids[call], timestamp: new Date(at) })
    await analytics.page('Home', { path: '/' }, options('page'))
    await analytics.track('Signed Up', { plan: 'pro' }, options('track'))
    // At sign-up, as Segment documents it: the new user id, the anonymous id as previousId.
    // (Once a user is identified, analytics-next sends that user's id as an alias's userId.)
    await analytics.alias(`${run}-user`, null, options('alias'))
    await analytics.identify(`${run}-user`, { email: 'ann@example.com' }, options('identify'))
    await analytics.track('Clicked', { button: 'buy' }, options('clicked'))
    await analytics.group(`${run}-team`, { name: 'Team' }, options('group'))
    // The resend: the same messageId again.
    await analytics.track('Signed Up', { plan: 'pro' }, options('track'))
    ids.anonymous = analytics.user().anonymousId()
    // A beacon as older analytics.js sent them: a text/plain body with the key inside.
    const beacon = {
      writeKey: key,
      type: 'track',
      event: 'Left',
      anonymousId: ids.anonymous,
      userId: `${run}-user`,
      messageId: ids.beacon,
      timestamp: at
    }
    if (!faults && !navigator.sendBeacon(`${host}/v1/t`, JSON.stringify(beacon))) throw new Error('sendBeacon refused')
    return ids
  }
}

const script = await sdkScript()
const page = `<!doctype html><html><head><meta charset="utf-8"><title>SDK test</title>
<script src="/sdk.js"></script></head><body><h1>StatsRemote SDK test</h1></body></html>`
const server = http.createServer((req, res) => {
  if (req.url === '/sdk.js') {
    res.writeHead(200, { 'content-type': 'text/javascript' })
    res.end(script)
  } else {
    res.writeHead(200, { 'content-type': 'text/html' })
    res.end(page)
  }
})
await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve))
const origin = `http://127.0.0.1:${server.address().port}`

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox']
})
const problems = []
const sent = []
let inflight = 0
let lastActivity = Date.now()
try {
  const context = await browser.newContext()
  const tab = await context.newPage()
  const toServer = (request) => request.url().startsWith(host)
  tab.on('console', (message) => {
    if (process.env.SHOW_CONSOLE) console.error(`console ${message.type()}: ${message.text()}`)
    if (message.type() === 'error') problems.push(`console: ${message.text()}`)
  })
  tab.on('pageerror', (error) => problems.push(`page error: ${error.message}`))
  tab.on('request', (request) => {
    if (!toServer(request)) return
    inflight += 1
    lastActivity = Date.now()
  })
  const settled = (request, outcome) => {
    if (!toServer(request)) return
    inflight -= 1
    lastActivity = Date.now()
    sent.push(`${request.method()} ${new URL(request.url()).pathname} ${outcome}`)
  }
  tab.on('requestfinished', async (request) => {
    const response = await request.response()
    const status = response ? response.status() : 0
    if (status >= 400) problems.push(`${request.url()} answered ${status}`)
    settled(request, status)
  })
  tab.on('requestfailed', (request) => {
    // A beacon's response is not for the page: Chromium reports it as failed once sent.
    const beacon = request.resourceType() === 'ping'
    if (!beacon) problems.push(`${request.url()} failed: ${request.failure()?.errorText}`)
    settled(request, beacon ? 'beacon' : 'failed')
  })
  await tab.goto(origin)
  const scenario = sdk === 'posthog-js' ? scenarios['posthog-js'] : scenarios.segment
  const ids = await tab.evaluate(scenario, { host, key, run, at, batching: sdk === 'segment-batching', debug: !!process.env.SHOW_CONSOLE, faults: !!faults })
  // posthog-js sends its queue every 3 s; retries back off for longer.
  const quiet = faults ? 8000 : 4000
  const deadline = Date.now() + 90000
  while ((inflight > 0 || Date.now() - lastActivity < quiet) && Date.now() < deadline) {
    await new Promise((resolve) => setTimeout(resolve, 200))
  }
  console.log(JSON.stringify({ origin, sent, problems }))
  if (!faults && problems.length > 0) {
    console.error(problems.join('\n'))
    process.exitCode = 1
  }
  console.log(JSON.stringify(ids))
} finally {
  await browser.close()
  server.close()
}
