// Series: one event's (or all events') count or distinct users per minute, hour or day over a
// range, as a chart with a table beside it, and a CSV download.

import { timeChart } from "../charts.js";
import { announce, ask, downloadCsv, field, h, number, percent, query, rangeControl, requests, select, suggestEvents, table, utc } from "../ui.js";

export const title = "Series";

/** The resolution that suits a preset range. */
const INTERVAL_FOR = { "1h": "minute", "24h": "hour", "7d": "hour", "30d": "day" };

export function render(main, params) {
  const event = h("input", { type: "text", name: "event", list: "series-events", value: params.get("event") || "", placeholder: "All events", autocomplete: "off" });
  const names = h("datalist", { id: "series-events" });
  const metric = select([["count", "Events (count)"], ["uniques", "Distinct users"]], params.get("metric") || "count", { name: "metric" });
  const interval = select([["minute", "Minute"], ["hour", "Hour"], ["day", "Day"]], params.get("interval") || "hour", { name: "interval" });
  const range = rangeControl(params, "24h");
  range.preset.addEventListener("change", () => {
    if (INTERVAL_FOR[range.preset.value]) interval.value = INTERVAL_FOR[range.preset.value];
  });
  const message = h("div", { "aria-live": "polite" });
  const chartBox = h("div");
  const tableBox = h("div", { class: "series-table" });
  const download = h("button", { type: "button", disabled: true }, "Download CSV");
  const form = h("form", { class: "controls", "aria-label": "Series query" },
    field("Event", event, "Leave empty for all events"), names,
    field("Metric", metric), field("Interval", interval), range.node,
    h("div", { class: "actions" }, h("button", { type: "submit", class: "primary" }, "Draw"), download));
  main.append(h("h1", {}, "Series"), form, message,
    h("div", { class: "chart-and-table" }, chartBox, tableBox));
  let chart = null;
  let points = [];
  const pending = requests();

  const draw = async () => {
    message.replaceChildren();
    const span = range.checked(message);
    if (!span) return;
    const name = event.value.trim();
    const asked = { event: name, metric: metric.value, interval: interval.value, from: span.from, to: span.to };
    history.replaceState(null, "", `#/series?${query({ ...asked, ...range.address(span) })}`);
    const signal = pending.next();
    suggestEvents(names, span, signal);
    const answer = await ask(message, `/v1/query/series?${query(asked)}`, { signal });
    if (!answer) return;
    points = answer.points;
    const what = metric.value === "count" ? "Events" : "Users";
    const label = `${what} of ${name || "all events"} per ${interval.value}`;
    chart?.destroy();
    chartBox.replaceChildren();
    chart = timeChart(chartBox, { series: [{ label: what }], label });
    chart.setData(points.map((p) => Date.parse(p.ts) / 1000), points.map((p) => p.value));
    const withError = points.some((p) => p.relative_error !== undefined);
    const columns = [
      { label: "Bucket start (UTC)", value: (p) => utc(p.ts) },
      { label: what, value: (p) => number(p.value), numeric: true },
    ];
    if (withError) columns.push({ label: "± (95%)", value: (p) => (p.relative_error === undefined ? "" : percent(p.relative_error)), numeric: true });
    tableBox.replaceChildren(table(label, columns, points, { "data-table": "series" }));
    download.disabled = false;
    // Distinct users do not add up across buckets, so only counts get a total.
    const total = metric.value === "count" ? `, ${number(points.reduce((sum, p) => sum + p.value, 0))} in all` : "";
    announce(`${label}: ${points.length} buckets${total}`);
  };

  download.addEventListener("click", () => {
    const name = event.value.trim() || "all-events";
    downloadCsv(`${name}-${metric.value}-${interval.value}.csv`, ["bucket_start", metric.value, "relative_error"],
      points.map((p) => [p.ts, p.value, p.relative_error ?? ""]));
  });
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    draw();
  });
  draw();
  return () => {
    pending.stop();
    chart?.destroy();
  };
}
