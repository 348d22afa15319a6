// The public API, called with the keys the user signed in with. Keys live in the browser's
// session storage (gone when the tab closes) and travel only in Authorization headers or, for
// the live WebSocket, as a subprotocol: never in a URL, which servers and proxies log.

const READ_KEY = "statsremote.readKey";
const ADMIN_TOKEN = "statsremote.adminToken";
const TENANT = "statsremote.tenant";

export const session = {
  get readKey() { return sessionStorage.getItem(READ_KEY); },
  get adminToken() { return sessionStorage.getItem(ADMIN_TOKEN); },
  /** `{id, name}` of the tenant the read key reads. */
  get tenant() {
    const stored = sessionStorage.getItem(TENANT);
    return stored ? JSON.parse(stored) : null;
  },
  signIn(readKey, tenant) {
    sessionStorage.setItem(READ_KEY, readKey);
    sessionStorage.setItem(TENANT, JSON.stringify(tenant));
  },
  signOut() {
    sessionStorage.removeItem(READ_KEY);
    sessionStorage.removeItem(TENANT);
  },
  setAdminToken(token) { sessionStorage.setItem(ADMIN_TOKEN, token); },
  forgetAdminToken() { sessionStorage.removeItem(ADMIN_TOKEN); },
};

/** An API answer other than 2xx, with its problem+json fields. */
export class ApiError extends Error {
  constructor(status, problem) {
    const detail = problem.detail || problem.title || `HTTP ${status}`;
    super(detail);
    this.status = status;
    this.problem = problem;
  }
}

/**
 * Calls the API. `auth` is "read" (the tenant's read key) or "admin" (the admin token).
 * Resolves with the parsed JSON answer; rejects with an ApiError naming what went wrong.
 */
export async function call(path, { auth = "read", method = "GET", body, signal } = {}) {
  const key = auth === "admin" ? session.adminToken : session.readKey;
  return callWith(key, path, { method, body, signal });
}

/** Like `call`, with an explicit key (for checking a key before it is kept). */
export async function callWith(key, path, { method = "GET", body, signal } = {}) {
  const headers = { Accept: "application/json" };
  if (key) headers.Authorization = `Bearer ${key}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
      cache: "no-store",
    });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, { detail: `the server cannot be reached (${error.message})` });
  }
  const text = await response.text();
  let parsed = null;
  try {
    parsed = text ? JSON.parse(text) : null;
  } catch {
    parsed = null;
  }
  if (!response.ok) {
    throw new ApiError(response.status, parsed || { detail: `HTTP ${response.status}: ${text.slice(0, 200)}` });
  }
  return parsed;
}

/** The live WebSocket's address on this origin. */
export function liveUrl() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}/v1/live`;
}

/** Subprotocols that carry the read key (see the README, "Live metrics"). */
export function liveProtocols() {
  return ["statsremote", `key.${session.readKey}`];
}
