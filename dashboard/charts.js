// Charts, drawn by uPlot (vendored from npm, dashboard/vendor/uplot). Each chart follows its
// container's width; the data is also always in a table beside it, for screen readers and
// for reading exact numbers.

/* global uPlot */

/** Colours with at least 4.5:1 contrast against the white background. */
export const COLORS = ["#1d4ed8", "#b45309", "#047857", "#7e22ce", "#be123c"];

const AXIS = { stroke: "#374151", grid: { stroke: "#e5e7eb" }, ticks: { stroke: "#d1d5db" } };

/** Whole-number steps for count axes (no 0.2 of an event). */
const COUNT_STEPS = [1, 2, 5].flatMap((step) => [1, 10, 100, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8].map((power) => step * power)).sort((a, b) => a - b);
const COUNT_AXIS = { ...AXIS, size: 60, incrs: COUNT_STEPS };

/** Follows the container's width; returns a function that stops following. */
function followWidth(plot, container, height) {
  const observer = new ResizeObserver(() => {
    const width = Math.max(container.clientWidth, 200);
    if (width !== plot.width) plot.setSize({ width, height });
  });
  observer.observe(container);
  return () => observer.disconnect();
}

/** Axis labels in UTC, 24-hour, as precise as the visible span needs. */
function utcLabels(u, splits) {
  const span = u.scales.x.max - u.scales.x.min;
  return splits.map((ts) => {
    const iso = new Date(ts * 1000).toISOString();
    if (span > 3 * 86_400) return iso.slice(5, 10);
    if (span > 86_400) return `${iso.slice(5, 10)} ${iso.slice(11, 16)}`;
    if (span > 600) return iso.slice(11, 16);
    return iso.slice(11, 19);
  });
}

/**
 * A time chart in UTC. `series`: `[{label, color?}]`. Returns `{setData(xs, ...ys), destroy()}`,
 * `xs` in seconds since the epoch.
 */
export function timeChart(container, { series, height = 260, label }) {
  container.classList.add("chart");
  container.setAttribute("role", "img");
  container.setAttribute("aria-label", label);
  const opts = {
    width: Math.max(container.clientWidth, 200),
    height,
    tzDate: (ts) => uPlot.tzDate(new Date(ts * 1000), "Etc/UTC"),
    scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(max, 1) * 1.1] } },
    axes: [{ ...AXIS, values: utcLabels, space: 70 }, COUNT_AXIS],
    series: [
      { label: "Time (UTC)", value: (u, ts) => (ts == null ? "–" : new Date(ts * 1000).toISOString().slice(0, 19).replace("T", " ")) },
      ...series.map((s, i) => ({
        label: s.label,
        stroke: s.color || COLORS[i % COLORS.length],
        width: 2,
        points: { show: false },
        value: (u, v) => (v == null ? "–" : Math.round(v).toLocaleString("en")),
      })),
    ],
    legend: { live: true },
  };
  const empty = [[], ...series.map(() => [])];
  const plot = new uPlot(opts, empty, container);
  const stop = followWidth(plot, container, height);
  return {
    setData(xs, ...ys) { plot.setData([xs, ...ys]); },
    destroy() { stop(); plot.destroy(); },
  };
}

/** A bar chart of `values` over named categories (a funnel's steps). */
export function barChart(container, { names, values, label, height = 260 }) {
  container.classList.add("chart");
  container.setAttribute("role", "img");
  container.setAttribute("aria-label", label);
  const xs = names.map((_, i) => i);
  const opts = {
    width: Math.max(container.clientWidth, 200),
    height,
    scales: {
      x: { time: false, range: () => [-0.5, names.length - 0.5] },
      y: { range: (u, min, max) => [0, Math.max(max, 1) * 1.1] },
    },
    axes: [
      { ...AXIS, splits: () => xs, values: (u, splits) => splits.map((i) => names[i] ?? "") },
      COUNT_AXIS,
    ],
    series: [
      { label: "Step", value: (u, i) => names[i] ?? "" },
      {
        label: "Users",
        stroke: COLORS[0],
        fill: "rgba(29, 78, 216, 0.35)",
        paths: uPlot.paths.bars({ size: [0.6, 120] }),
        points: { show: false },
      },
    ],
    legend: { show: false },
    cursor: { show: false },
  };
  const plot = new uPlot(opts, [xs, values], container);
  const stop = followWidth(plot, container, height);
  return { destroy() { stop(); plot.destroy(); } };
}
