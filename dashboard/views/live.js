// Live: the tenant's events and distinct users per second from `/v1/live`, a moving chart of
// the last two minutes, and the current minute's top events. Reconnects by itself.

import { callWith, liveProtocols, liveUrl, session } from "../api.js";
import { timeChart } from "../charts.js";
import { announce, h, number, table } from "../ui.js";

/** Seconds kept on the chart. */
const WINDOW = 120;
/** Longest wait between reconnection attempts. */
const MAX_BACKOFF_MS = 10_000;
/** Without a tick for this long the connection is taken for dead and opened again. */
const STALL_MS = 5_000;

export const title = "Live";

export function render(main) {
  // Plain text, not live regions: a screen reader would otherwise read four numbers a second.
  const stat = (name, label) => h("div", { class: "stat" },
    h("span", { class: "stat-label" }, label),
    h("span", { class: "stat-value", "data-metric": name }, "–"));
  const status = h("p", { class: "connection", role: "status" }, "Connecting…");
  const chartBox = h("div");
  const top = h("div", { class: "live-top" });
  main.append(
    h("h1", {}, "Live"),
    status,
    h("div", { class: "stats" },
      stat("events-per-second", "Events / second"),
      stat("users-per-second", "Users / second"),
      stat("events-this-minute", "Events this minute"),
      stat("users-this-minute", "Users this minute")),
    h("section", { "aria-labelledby": "live-chart-title" },
      h("h2", { id: "live-chart-title" }, "Last two minutes"), chartBox),
    h("section", { "aria-labelledby": "live-top-title" },
      h("h2", { id: "live-top-title" }, "Top events this minute"), top),
  );
  const chart = timeChart(chartBox, {
    series: [{ label: "Events/s" }, { label: "Users/s" }],
    label: "Events and distinct users per second over the last two minutes",
  });
  const seconds = new Map();
  let socket = null;
  let timer = null;
  let stall = null;
  let attempts = 0;
  let stopped = false;
  let marked = false;
  let minuteRows = null;
  let minuteSignature = "";

  const show = (name, value) => {
    main.querySelector(`[data-metric="${name}"]`).textContent = number(value);
  };

  const onTick = (tick) => {
    const second = tick.second;
    show("events-per-second", second.total.count);
    show("users-per-second", second.total.uniques);
    show("events-this-minute", tick.minute.total.count);
    show("users-this-minute", tick.minute.total.uniques);
    if (!marked) {
      marked = true;
      performance.mark("statsremote:first-live-number");
    }
    seconds.set(Date.parse(second.start) / 1000, second.total);
    const newest = Math.max(...seconds.keys());
    for (const at of seconds.keys()) if (at <= newest - WINDOW) seconds.delete(at);
    const xs = [];
    for (let at = newest - WINDOW + 1; at <= newest; at += 1) xs.push(at);
    // Seconds never received (skipped ticks, a reconnection) are gaps, not zeros.
    chart.setData(xs, xs.map((at) => seconds.get(at)?.count ?? null), xs.map((at) => seconds.get(at)?.uniques ?? null));
    const rows = Object.entries(tick.minute.events)
      .map(([event, v]) => ({ event, count: v.count, uniques: v.uniques }))
      .sort((a, b) => b.count - a.count || a.event.localeCompare(b.event))
      .slice(0, 10);
    showMinute(rows);
  };

  // The minute's table is built once; its rows are replaced in place, so the scrollable
  // region keeps its focus.
  const showMinute = (rows) => {
    const signature = JSON.stringify(rows);
    if (signature === minuteSignature) return;
    minuteSignature = signature;
    if (!minuteRows) {
      top.replaceChildren(table("Top events this minute (UTC minute of event time)", [
        { label: "Event", value: (r) => r.event },
        { label: "Events", value: (r) => number(r.count), numeric: true },
        { label: "Users", value: (r) => number(r.uniques), numeric: true },
      ], rows, { "data-table": "live-top" }));
      minuteRows = top.querySelector("tbody");
      return;
    }
    const fresh = table("", [
      { label: "", value: (r) => r.event },
      { label: "", value: (r) => number(r.count), numeric: true },
      { label: "", value: (r) => number(r.uniques), numeric: true },
    ], rows).querySelector("tbody");
    minuteRows.replaceChildren(...fresh.childNodes);
  };

  const watchdog = () => {
    clearTimeout(stall);
    stall = setTimeout(() => {
      setStatus("No numbers for a while; reconnecting…", "retrying");
      socket?.close(4000, "no ticks");
    }, STALL_MS);
  };

  const setStatus = (text, state) => {
    status.textContent = text;
    status.dataset.state = state;
  };

  const connect = () => {
    if (stopped) return;
    socket = new WebSocket(liveUrl(), liveProtocols());
    socket.addEventListener("open", () => {
      setStatus("Live: updating every second.", "open");
      announce("Live numbers connected");
      watchdog();
    });
    socket.addEventListener("message", (message) => {
      let tick;
      try {
        tick = JSON.parse(message.data);
      } catch {
        return;
      }
      if (tick.second && tick.minute) {
        // The backoff starts over only once the server has sent numbers, not on every open.
        attempts = 0;
        watchdog();
        onTick(tick);
      }
    });
    socket.addEventListener("close", async (event) => {
      clearTimeout(stall);
      if (stopped) return;
      // A refused or revoked key is not worth retrying: say so instead.
      try {
        await callWith(session.readKey, "/v1/tenant");
      } catch (error) {
        if (error.status === 401 || error.status === 403) {
          setStatus("This read key is no longer valid (rotated or deleted). Sign out and sign in with the new key.", "refused");
          return;
        }
      }
      attempts += 1;
      // Jittered, so many tabs that lost the server together do not come back together.
      const delay = Math.min(1000 * 2 ** (attempts - 1), MAX_BACKOFF_MS) * (0.75 + Math.random() / 2);
      setStatus(`Disconnected (${event.code || "no answer"}); reconnecting in ${Math.round(delay / 1000)} s…`, "retrying");
      timer = setTimeout(connect, delay);
    });
  };
  connect();

  return () => {
    stopped = true;
    clearTimeout(timer);
    clearTimeout(stall);
    if (socket) socket.close(1000, "view closed");
    chart.destroy();
  };
}
