// Read-only views of what the tenant's data went through: cold segments, dead letters and the
// tracking plan, with the read key.

import { call } from "../api.js";
import { errorBox, h, number, table, utc } from "../ui.js";

/** Loads `path` and shows what `build(answer)` makes of it, or the server's error. */
async function load(main, heading, path, build) {
  const body = h("div", { "aria-busy": "true" }, "Loading…");
  main.append(h("h1", {}, heading), body);
  try {
    const answer = await call(path);
    body.replaceChildren(...[build(answer)].flat());
  } catch (error) {
    body.replaceChildren(errorBox(error));
  }
  body.removeAttribute("aria-busy");
}

const bytes = (n) => {
  if (n < 1024) return `${n} B`;
  const units = ["KiB", "MiB", "GiB", "TiB"];
  let value = n;
  let unit = -1;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value.toFixed(1)} ${units[unit]}`;
};

export const segments = {
  title: "Cold segments",
  render(main) {
    load(main, "Cold segments", "/v1/segments", (answer) => [
      h("p", {}, `Events are in Parquet segments through log sequence ${number(answer.cold_watermark)}; `,
        "later events are still in the hot log."),
      table("Segments in the cold tier", [
        { label: "Hour (UTC)", value: (s) => utc(s.hour) },
        { label: "Sequences", value: (s) => `${number(s.first_seq)}–${number(s.last_seq)}` },
        { label: "Events", value: (s) => number(s.rows), numeric: true },
        { label: "Size", value: (s) => bytes(s.bytes), numeric: true },
        { label: "Object", value: (s) => h("code", {}, s.path) },
      ], answer.segments, { "data-table": "segments" }),
    ]);
  },
};

export const deadLetters = {
  title: "Dead letters",
  render(main) {
    const rows = [];
    const columns = [
      { label: "Received (UTC)", value: (l) => utc(l.received_at) },
      { label: "Event", value: (l) => l.event ?? "" },
      { label: "Reason", value: (l) => l.reason.kind },
      { label: "Why", value: (l) => l.reason.summary ?? "" },
      { label: "messageId", value: (l) => h("code", {}, l.message_id ?? "") },
      { label: "Replays", value: (l) => number(l.replays), numeric: true },
    ];
    const box = h("div");
    const problem = h("div", { "aria-live": "polite" });
    const more = h("button", { type: "button", hidden: true }, "Older letters");
    let next = null;
    const page = async () => {
      // One page at a time: a second click while one loads would fetch it twice.
      more.disabled = true;
      problem.replaceChildren();
      const path = `/v1/deadletter?limit=100${next ? `&before=${encodeURIComponent(next)}` : ""}`;
      try {
        const answer = await call(path);
        rows.push(...answer.items);
        next = answer.next ?? null;
        box.replaceChildren(table("Dead letters, newest first", columns, rows, { "data-table": "deadletters" }));
        more.hidden = !next;
      } catch (error) {
        // The letters already shown stay.
        problem.replaceChildren(errorBox(error));
      }
      more.disabled = false;
    };
    more.addEventListener("click", page);
    main.append(h("h1", {}, "Dead letters"),
      h("p", {}, "Events the tracking plan refused. An operator replays them through the admin API once the plan or the client is fixed."),
      box, problem, more);
    page();
  },
};

export const schemas = {
  title: "Schemas",
  render(main) {
    load(main, "Schemas", "/v1/schemas", (plan) => {
      const inForce = (e) => e.versions.find((v) => v.version === e.in_force);
      const details = plan.events.map((e) => h("details", {},
        h("summary", {}, `${e.event}: ${e.versions.length} version(s)`),
        e.versions.map((v) => h("div", { class: "schema-version" },
          h("p", {}, `Version ${v.version}, ${v.compatibility}, registered ${utc(v.created_at)}`,
            v.retired_at ? `, retired ${utc(v.retired_at)}` : "", v.version === e.in_force ? " (in force)" : ""),
          h("pre", {}, JSON.stringify(v.schema, null, 2))))));
      return [
        h("p", {}, `Enforcement: ${plan.schema_enforcement}; events without a schema: ${plan.unplanned_events}.`),
        table("Tracking plan", [
          { label: "Event", value: (e) => e.event },
          { label: "In force", value: (e) => (e.in_force ? `version ${e.in_force}` : "none (retired)") },
          { label: "Enforcement", value: (e) => inForce(e)?.enforcement ?? `tenant (${plan.schema_enforcement})` },
          { label: "Compatibility", value: (e) => inForce(e)?.compatibility ?? "" },
        ], plan.events, { "data-table": "schemas" }),
        details,
      ];
    });
  },
};
