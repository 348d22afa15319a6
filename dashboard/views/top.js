// Top events: each event's count and distinct users over a range, largest first. An event's
// name opens its series over the same range.

import { ask, field, h, number, percent, query, rangeControl, requests, table } from "../ui.js";

export const title = "Top events";

export function render(main, params) {
  const range = rangeControl(params, "24h");
  const limit = h("input", { type: "number", name: "limit", min: 1, max: 10000, value: params.get("limit") || 100, inputmode: "numeric" });
  const message = h("div", { "aria-live": "polite" });
  const result = h("div");
  const form = h("form", { class: "controls", "aria-label": "Top events query" },
    range.node, field("At most", limit),
    h("div", { class: "actions" }, h("button", { type: "submit", class: "primary" }, "Show")));
  main.append(h("h1", {}, "Top events"), form, message, result);

  const pending = requests();
  const show = async () => {
    message.replaceChildren();
    const span = range.checked(message);
    if (!span) return;
    const asked = { from: span.from, to: span.to, limit: limit.value };
    history.replaceState(null, "", `#/top?${query({ ...asked, ...range.address(span) })}`);
    const answer = await ask(message, `/v1/query/events?${query(asked)}`, { signal: pending.next() });
    if (!answer) return;
    const seriesLink = (name) => h("a", {
      href: `#/series?${query({ event: name, from: span.from, to: span.to, range: "custom", interval: "hour" })}`,
    }, name);
    const sampled = answer.events.some((e) => e.relative_error);
    const columns = [
      { label: "Event", value: (e) => seriesLink(e.event) },
      { label: "Events", value: (e) => number(e.count), numeric: true },
      { label: "Distinct users", value: (e) => number(e.uniques), numeric: true },
    ];
    if (sampled) {
      columns.push({ label: "± events (95%)", value: (e) => (e.relative_error ? percent(e.relative_error.count) : ""), numeric: true });
      columns.push({ label: "± users (95%)", value: (e) => (e.relative_error ? percent(e.relative_error.uniques) : ""), numeric: true });
    }
    result.replaceChildren(table("Events over the range, largest count first", columns, answer.events, { "data-table": "top" }));
  };
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    show();
  });
  show();
  return () => pending.stop();
}
