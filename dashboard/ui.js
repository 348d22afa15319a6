// Small DOM helpers shared by the views. Text always goes in as text (never as HTML), so
// event names and letters from clients cannot inject markup.

import { call } from "./api.js";

/** An element with attributes (`on*` functions become listeners) and children. */
export function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") {
      node.addEventListener(name.slice(2), value);
    } else if (name === "class") {
      node.className = value;
    } else if (value === true) {
      node.setAttribute(name, "");
    } else {
      node.setAttribute(name, String(value));
    }
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

let ids = 0;
/** A fresh element id, for label/input pairs. */
export function uid(prefix) {
  ids += 1;
  return `${prefix}-${ids}`;
}

/** A labelled form control. */
export function field(label, control, hint) {
  control.id ||= uid("f");
  const hintNode = hint ? h("small", { id: `${control.id}-hint`, class: "hint" }, hint) : null;
  if (hintNode) control.setAttribute("aria-describedby", hintNode.id);
  return h("div", { class: "field" }, h("label", { for: control.id }, label), control, hintNode);
}

/** A `<select>` of `[value, label]` pairs. */
export function select(options, value, attrs = {}) {
  return h("select", attrs, options.map(([v, label]) => h("option", { value: v, selected: v === value }, label)));
}

const integer = new Intl.NumberFormat("en");
export function number(n) {
  return typeof n === "number" ? integer.format(n) : "–";
}

export function percent(ratio) {
  if (!Number.isFinite(ratio)) return "–";
  return `${(ratio * 100).toFixed(1)}%`;
}

/** `2026-01-02T03:04:05.000Z` as `2026-01-02 03:04:05` (UTC), seconds only when not zero. */
export function utc(iso) {
  const text = iso.replace("T", " ").replace(/\.\d+Z$/, "").replace(/Z$/, "");
  return text.endsWith(":00") ? text.slice(0, -3) : text;
}

/** A table; `columns` are `{label, value(row), numeric?}`. */
export function table(caption, columns, rows, attrs = {}) {
  return h("div", { class: "table-wrap", tabindex: 0, role: "region", "aria-label": caption },
    h("table", attrs,
      h("caption", {}, caption),
      h("thead", {}, h("tr", {}, columns.map((c) => h("th", { scope: "col", class: c.numeric ? "num" : null }, c.label)))),
      h("tbody", {}, rows.length === 0
        ? h("tr", {}, h("td", { colspan: columns.length, class: "empty" }, "Nothing here yet."))
        : rows.map((row) => h("tr", {}, columns.map((c) => h("td", { class: c.numeric ? "num" : null }, c.value(row))))))));
}

/** A polite error message naming what the server said. */
export function errorBox(error) {
  const status = error.status ? ` (HTTP ${error.status})` : "";
  return h("div", { class: "error", role: "alert" }, `${error.message}${status}`);
}

/** Says `text` to screen readers. */
export function announce(text) {
  const node = document.getElementById("announce");
  if (node) node.textContent = text;
}

/** Offers `rows` (arrays) under `header` as a CSV download named `name`. */
export function downloadCsv(name, header, rows) {
  const quote = (value) => {
    const text = String(value ?? "");
    return /[",\n\r]/.test(text) ? `"${text.replaceAll('"', '""')}"` : text;
  };
  const lines = [header, ...rows].map((row) => row.map(quote).join(","));
  const blob = new Blob([`${lines.join("\r\n")}\r\n`], { type: "text/csv" });
  const link = h("a", { href: URL.createObjectURL(blob), download: name });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
}

const PRESETS = [
  ["1h", "Last hour", 3600],
  ["24h", "Last 24 hours", 86_400],
  ["7d", "Last 7 days", 7 * 86_400],
  ["30d", "Last 30 days", 30 * 86_400],
  ["custom", "Custom range (UTC)", 0],
];

/** `Date` as the value of a `datetime-local` input, in UTC. */
function localValue(date) {
  return date.toISOString().slice(0, 16);
}

/**
 * Range controls: presets and a custom range of two UTC times, starting from the view's
 * address (`range`, and `from` and `to` for a custom one) or `initial`. `value()` gives
 * `{from, to}` as RFC 3339, or throws an Error naming what is wrong with the custom range.
 */
export function rangeControl(params, initial) {
  const preset = select(PRESETS.map(([v, l]) => [v, l]), params.get("range") || initial, { name: "range" });
  const now = new Date();
  const from = h("input", { type: "datetime-local", name: "from", value: localValue(new Date(now - 86_400_000)) });
  const to = h("input", { type: "datetime-local", name: "to", value: localValue(now) });
  const custom = h("div", { class: "custom-range" },
    field("From (UTC)", from), field("To (UTC)", to));
  const sync = () => { custom.hidden = preset.value !== "custom"; };
  preset.addEventListener("change", sync);
  if (params.get("from") && params.get("to")) {
    preset.value = "custom";
    from.value = params.get("from").slice(0, 16);
    to.value = params.get("to").slice(0, 16);
  }
  sync();
  const node = h("div", { class: "range" }, field("Time range", preset), custom);
  return {
    node,
    preset,
    /** The range, or `null` after saying in `message` what is wrong with it. */
    checked(message) {
      try {
        return this.value();
      } catch (error) {
        message.replaceChildren(errorBox(error));
        return null;
      }
    },
    /** The range as the view's address keeps it: a preset stays a preset (reloading shows the
     * latest range), a custom range keeps its times. */
    address(span) {
      const kept = preset.value === "custom";
      return { range: preset.value, from: kept ? span.from : "", to: kept ? span.to : "" };
    },
    value() {
      if (preset.value !== "custom") {
        const seconds = PRESETS.find(([v]) => v === preset.value)[2];
        const end = new Date();
        return { from: new Date(end - seconds * 1000).toISOString(), to: end.toISOString() };
      }
      if (!from.value || !to.value) throw new Error("a custom range needs both a start and an end");
      const start = new Date(`${from.value}:00Z`);
      const end = new Date(`${to.value}:00Z`);
      if (Number.isNaN(start.getTime()) || Number.isNaN(end.getTime())) throw new Error("the custom range is not a valid time");
      if (end <= start) throw new Error("the custom range ends before it starts");
      return { from: start.toISOString(), to: end.toISOString() };
    },
  };
}

/**
 * The requests of one view, newest first: `next()` gives the signal of a new request and
 * aborts the one before (so an older answer can never overwrite a newer one), `stop()` aborts
 * the last when the view closes. A view checks `signal.aborted` after each await.
 */
export function requests() {
  let current = null;
  return {
    next() {
      current?.abort();
      current = new AbortController();
      return current.signal;
    },
    stop() {
      current?.abort();
    },
  };
}

/**
 * The answer of an API call made with `options.signal`, or `null`: aborted (a newer request
 * or the view's end superseded it), or failed, which `message` then says.
 */
export async function ask(message, path, options) {
  try {
    const answer = await call(path, options);
    return options.signal.aborted ? null : answer;
  } catch (error) {
    if (!options.signal.aborted) message.replaceChildren(errorBox(error));
    return null;
  }
}

/** Fills `list` (a datalist) with the names of the events over `span`, as suggestions. */
export function suggestEvents(list, span, signal) {
  call(`/v1/query/events?${query({ from: span.from, to: span.to, limit: 1000 })}`, { signal })
    .then((answer) => list.replaceChildren(...answer.events.map((e) => h("option", { value: e.event }))))
    // Suggestions only: the view's own query reports errors.
    .catch(() => {});
}

/**
 * A sign-in form for one secret: `check(value)` asks the server whether it works (and
 * rejects with its reason), `accept(value, answer)` keeps it.
 */
export function keyForm({ name, label, hint, button, title, check, accept }) {
  const input = h("input", { type: "password", name, required: true, autocomplete: "off", spellcheck: "false" });
  const message = h("div", { "aria-live": "polite" });
  const form = h("form", { class: "controls signin", "aria-label": title },
    field(label, input, hint),
    h("div", { class: "actions" }, h("button", { type: "submit", class: "primary" }, button)));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    message.replaceChildren();
    const value = input.value.trim();
    try {
      accept(value, await check(value));
    } catch (error) {
      message.replaceChildren(errorBox(error));
      input.focus();
    }
  });
  return { form, message, input };
}

/** A query string from an object, leaving out empty values. */
export function query(params) {
  const search = new URLSearchParams();
  for (const [name, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== "") search.set(name, value);
  }
  return search.toString();
}
