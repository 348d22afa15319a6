// Sends a known set of events to StatsRemote through an official Node SDK, as an app would.
//
// Usage: node send.mjs <sdk> <host> <key> <run>
//   sdk: segment (@segment/analytics-node) or posthog (posthog-node)
//
// Every call type of the SDK is sent once, the first event again with the same id (a retry the
// server must count once), then the SDK is flushed and closed. Prints the ids it used.
import { createRequire } from 'node:module'
const require = createRequire(process.env.NODE_ENV_DIR + '/package.json')

const [sdk, host, key, run] = process.argv.slice(2)
const at = new Date('2026-03-01T10:00:00Z')
const user = `${run}-user`
const ids = {}

if (sdk === 'segment') {
  const { Analytics } = require('@segment/analytics-node')
  const analytics = new Analytics({ writeKey: key, host, flushInterval: 100, maxRetries: 5 })
  for (const call of ['track', 'identify', 'page', 'screen', 'group', 'alias']) ids[call] = `${run}-${call}`
  analytics.track({ userId: user, event: 'Signed Up', properties: { plan: 'pro' }, timestamp: at, messageId: ids.track })
  analytics.identify({ userId: user, traits: { email: 'ann@example.com' }, timestamp: at, messageId: ids.identify })
  analytics.page({ userId: user, name: 'Home', properties: { path: '/' }, timestamp: at, messageId: ids.page })
  analytics.screen({ userId: user, name: 'Main', timestamp: at, messageId: ids.screen })
  analytics.group({ userId: user, groupId: `${run}-team`, traits: { size: 3 }, timestamp: at, messageId: ids.group })
  analytics.alias({ userId: user, previousId: `${run}-anon`, timestamp: at, messageId: ids.alias })
  analytics.track({ userId: user, event: 'Signed Up', properties: { plan: 'pro' }, timestamp: at, messageId: ids.track })
  await analytics.closeAndFlush()
} else if (sdk === 'posthog') {
  const { PostHog } = require('posthog-node')
  const posthog = new PostHog(key, { host, flushAt: 100, flushInterval: 100 })
  const base = '0190a0e0-0000-7000-8000-'
  ;['capture', 'identify', 'alias', 'group_identify'].forEach((call, n) => {
    ids[call] = `${base}${String(n).padStart(12, '0')}`
  })
  posthog.capture({ distinctId: user, event: 'signed_up', properties: { plan: 'pro' }, timestamp: at, uuid: ids.capture })
  posthog.identify({ distinctId: user, properties: { email: 'ann@example.com' }, timestamp: at, uuid: ids.identify })
  posthog.alias({ distinctId: user, alias: `${run}-new`, timestamp: at, uuid: ids.alias })
  posthog.groupIdentify({ groupType: 'company', groupKey: `${run}-team`, properties: { size: 3 }, distinctId: user, timestamp: at, uuid: ids.group_identify })
  posthog.capture({ distinctId: user, event: 'signed_up', properties: { plan: 'pro' }, timestamp: at, uuid: ids.capture })
  await posthog.shutdown()
} else {
  console.error(`unknown sdk ${sdk}`)
  process.exit(2)
}
console.log(JSON.stringify(ids))
