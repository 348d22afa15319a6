// Funnel builder: users who did the steps in order within a window, over a range, with the
// conversion from each step to the next and from the first.

import { barChart } from "../charts.js";
import { announce, ask, errorBox, field, h, number, percent, query, rangeControl, requests, select, suggestEvents, table } from "../ui.js";

export const title = "Funnel";

const WINDOWS = [["5m", "5 minutes"], ["30m", "30 minutes"], ["1h", "1 hour"], ["1d", "1 day"], ["7d", "7 days"], ["30d", "30 days"]];
const MAX_STEPS = 20;

export function render(main, params) {
  const names = h("datalist", { id: "funnel-events" });
  const steps = h("ol", { class: "steps" });
  const addStep = (value = "") => {
    const input = h("input", { type: "text", name: "step", list: "funnel-events", value, required: true, autocomplete: "off" });
    const remove = h("button", { type: "button", class: "quiet" }, "Remove");
    const item = h("li", {}, field("Event", input), remove);
    remove.addEventListener("click", () => {
      if (steps.children.length > 2) {
        item.remove();
        renumber();
      }
    });
    steps.append(item);
    renumber();
    return input;
  };
  const renumber = () => {
    [...steps.children].forEach((item, i) => {
      item.querySelector("label").textContent = `Step ${i + 1}`;
      item.querySelector("button").setAttribute("aria-label", `Remove step ${i + 1}`);
    });
  };
  const initial = (params.get("steps") || "").split("\n").filter(Boolean);
  for (const step of initial.length >= 2 ? initial : ["", ""]) addStep(step);
  const more = h("button", { type: "button" }, "Add a step");
  more.addEventListener("click", () => {
    if (steps.children.length < MAX_STEPS) addStep().focus();
  });
  const windowSelect = select(WINDOWS, params.get("window") || "1d", { name: "window" });
  const range = rangeControl(params, "7d");
  const message = h("div", { "aria-live": "polite" });
  const chartBox = h("div");
  const tableBox = h("div");
  const form = h("form", { class: "controls funnel-form", "aria-label": "Funnel" },
    h("fieldset", {}, h("legend", {}, "Steps, in order"), steps, more), names,
    field("Within", windowSelect, "Each step within this time of the first"), range.node,
    h("div", { class: "actions" }, h("button", { type: "submit", class: "primary" }, "Compute")));
  main.append(h("h1", {}, "Funnel"), form, message, h("div", { class: "chart-and-table" }, chartBox, tableBox));
  let chart = null;
  const pending = requests();

  const compute = async () => {
    message.replaceChildren();
    const span = range.checked(message);
    if (!span) return;
    const chosen = [...steps.querySelectorAll("input")].map((input) => input.value.trim());
    if (chosen.some((s) => !s)) {
      message.replaceChildren(errorBox(new Error("every step needs an event name")));
      return;
    }
    const signal = pending.next();
    suggestEvents(names, span, signal);
    history.replaceState(null, "", `#/funnel?${query({ steps: chosen.join("\n"), window: windowSelect.value, ...range.address(span) })}`);
    const body = { steps: chosen, window: windowSelect.value, from: span.from, to: span.to };
    const answer = await ask(message, "/v1/query/funnel", { method: "POST", signal, body });
    if (!answer) return;
    const rows = answer.steps.map((step, i) => ({
      n: i + 1,
      event: step.event,
      users: step.users,
      error: step.relative_error,
      fromPrevious: i === 0 ? 1 : step.users / answer.steps[i - 1].users,
      fromFirst: step.users / answer.steps[0].users,
    }));
    chart?.destroy();
    chartBox.replaceChildren();
    chart = barChart(chartBox, {
      names: rows.map((r) => `${r.n}. ${r.event}`),
      values: rows.map((r) => r.users),
      label: `Funnel: users at each of ${rows.length} steps`,
    });
    const columns = [
      { label: "Step", value: (r) => r.n, numeric: true },
      { label: "Event", value: (r) => r.event },
      { label: "Users", value: (r) => number(r.users), numeric: true },
      { label: "From previous", value: (r) => percent(r.fromPrevious), numeric: true },
      { label: "From first", value: (r) => percent(r.fromFirst), numeric: true },
    ];
    // Sampled tenants' funnels are estimates.
    if (rows.some((r) => r.error !== undefined)) columns.push({ label: "± (95%)", value: (r) => (r.error === undefined ? "" : percent(r.error)), numeric: true });
    tableBox.replaceChildren(table("Users at each step", columns, rows, { "data-table": "funnel" }));
    const last = rows[rows.length - 1];
    announce(`Funnel computed: ${number(last.users)} users reached the last step, ${percent(last.fromFirst)} of the first`);
  };
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    compute();
  });
  if (initial.length >= 2) compute();
  return () => {
    pending.stop();
    chart?.destroy();
  };
}
