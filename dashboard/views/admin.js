// Admin: the operator's view, with the admin token. Lists tenants, creates one (its keys are
// shown once), rotates keys and changes settings through the admin API.

import { ApiError, call, callWith, session } from "../api.js";
import { announce, errorBox, field, h, keyForm, select, table, utc } from "../ui.js";

export const title = "Admin";

/** Settings with a fixed set of values (see the README's settings table). */
const CHOICES = {
  schema_enforcement: ["off", "warn", "reject"],
  unplanned_events: ["accept", "warn", "reject"],
};

const HINTS = {
  dedup_window: "A duration, e.g. 7days or 12h",
  deadletter_retention: "A duration, e.g. 30days",
  deadletter_max_bytes: "A size, e.g. 256 MiB",
  sampling: 'JSON, e.g. {"default": 1.0, "events": {"Page Viewed": 0.1}}; {} for none',
};

export function render(main, params, app) {
  main.append(h("h1", {}, "Admin"));
  if (!session.adminToken) {
    signIn(main, app);
    return;
  }
  const message = h("div", { "aria-live": "polite" });
  const list = h("div");
  const panel = h("section", { class: "panel", hidden: true, "aria-labelledby": "panel-title" });
  const forget = h("button", { type: "button", class: "quiet" }, "Forget the admin token");
  forget.addEventListener("click", () => {
    session.forgetAdminToken();
    app.refresh();
  });

  // The one panel under the list: a tenant's keys, key rotation or settings.
  const openPanel = (heading, ...content) => {
    panel.replaceChildren(h("h2", { id: "panel-title", tabindex: -1 }, heading), ...content);
    panel.hidden = false;
    panel.querySelector("h2").focus();
  };

  const showKeys = (heading, keys, tenant) => {
    const open = keys.read_key
      ? h("button", { type: "button", onclick: () => app.signIn(keys.read_key, { id: tenant.id, name: tenant.name }) }, "Open this tenant's dashboard")
      : null;
    openPanel(heading,
      h("p", { class: "warning" }, "These keys are shown only now: copy them to where your apps keep secrets."),
      h("dl", { class: "keys" },
        keys.write_key ? [h("dt", {}, "Write key"), h("dd", {}, h("code", { "data-key": "write" }, keys.write_key))] : null,
        keys.read_key ? [h("dt", {}, "Read key"), h("dd", {}, h("code", { "data-key": "read" }, keys.read_key))] : null),
      open);
  };

  const rotate = (tenant) => {
    const which = select([["both", "Both keys"], ["write", "Write key only"], ["read", "Read key only"]], "both", { name: "which" });
    const form = h("form", { class: "controls" }, field("Keys to replace", which),
      h("div", { class: "actions" }, h("button", { type: "submit", class: "danger" }, "Rotate now")));
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      try {
        const keys = await call(`/admin/v1/tenants/${tenant.id}/rotate-keys`, { auth: "admin", method: "POST", body: { which: which.value } });
        showKeys(`New keys of ${tenant.name}`, keys, tenant);
        announce(`Keys of ${tenant.name} rotated; the old ones are refused from now on`);
      } catch (error) {
        form.append(errorBox(error));
      }
    });
    openPanel(`Rotate keys of ${tenant.name}`,
      h("p", {}, "The replaced keys stop working at once, and live sessions using them end."), form);
  };

  const edit = (tenant) => {
    const inputs = Object.entries(tenant.settings).map(([name, value]) => {
      const kind = CHOICES[name] ? "choice" : typeof value === "object" ? "json" : typeof value;
      const input = kind === "choice"
        ? select(CHOICES[name].map((v) => [v, v]), value, { name })
        : kind === "json"
          ? h("textarea", { name, rows: 3, spellcheck: "false" }, JSON.stringify(value))
          : h("input", { name, type: kind === "number" ? "number" : "text", value: String(value) });
      return { name, kind, input };
    });
    const show = (settings) => {
      for (const i of inputs) i.input.value = i.kind === "json" ? JSON.stringify(settings[i.name]) : String(settings[i.name]);
    };
    const form = h("form", { class: "controls settings" },
      inputs.map((i) => field(i.name, i.input, HINTS[i.name])),
      h("div", { class: "actions" }, h("button", { type: "submit", class: "primary" }, "Save settings")));
    const outcome = h("div", { "aria-live": "polite" });
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      outcome.replaceChildren();
      const changed = {};
      for (const i of inputs) {
        const text = i.input.value.trim();
        let value = text;
        if (i.kind === "json") {
          try {
            // Empty is the setting's "none" (`{}`: no sampling), never a JSON null.
            value = text === "" ? {} : JSON.parse(text);
          } catch (error) {
            outcome.replaceChildren(errorBox(new Error(`${i.name} is not valid JSON: ${error.message}`)));
            return;
          }
        } else if (i.kind === "number") {
          value = Number(text);
          if (text === "" || !Number.isFinite(value)) {
            outcome.replaceChildren(errorBox(new Error(`${i.name} must be a number`)));
            return;
          }
        }
        if (JSON.stringify(value) !== JSON.stringify(tenant.settings[i.name])) changed[i.name] = value;
      }
      if (Object.keys(changed).length === 0) {
        outcome.replaceChildren(h("p", {}, "Nothing changed."));
        return;
      }
      try {
        const updated = await call(`/admin/v1/tenants/${tenant.id}`, { auth: "admin", method: "PATCH", body: { settings: changed } });
        outcome.replaceChildren(h("p", { class: "ok" }, `Saved: ${Object.keys(changed).join(", ")}.`));
        Object.assign(tenant, updated);
        // What the server stored, as it says it (durations and sizes in its own words).
        show(updated.settings);
        refresh();
      } catch (error) {
        outcome.replaceChildren(errorBox(error));
      }
    });
    openPanel(`Settings of ${tenant.name}`, form, outcome);
  };

  const refresh = async () => {
    try {
      const answer = await call("/admin/v1/tenants", { auth: "admin" });
      list.replaceChildren(table("Tenants", [
        { label: "Name", value: (t) => t.name },
        { label: "Id", value: (t) => h("code", {}, t.id) },
        { label: "Created (UTC)", value: (t) => utc(t.created_at) },
        {
          label: "Actions",
          value: (t) => h("div", { class: "row-actions" },
            h("button", { type: "button", onclick: () => edit(t), "aria-label": `Settings of ${t.name}` }, "Settings"),
            h("button", { type: "button", onclick: () => rotate(t), "aria-label": `Rotate keys of ${t.name}` }, "Rotate keys")),
        },
      ], answer.tenants, { "data-table": "tenants" }));
    } catch (error) {
      if (error instanceof ApiError && error.status === 401) {
        session.forgetAdminToken();
        app.refresh();
        return;
      }
      list.replaceChildren(errorBox(error));
    }
  };

  const name = h("input", { type: "text", name: "name", required: true, maxlength: 200, autocomplete: "off" });
  const create = h("form", { class: "controls", "aria-label": "Create a tenant" }, field("New tenant's name", name),
    h("div", { class: "actions" }, h("button", { type: "submit", class: "primary" }, "Create tenant")));
  create.addEventListener("submit", async (e) => {
    e.preventDefault();
    message.replaceChildren();
    try {
      const created = await call("/admin/v1/tenants", { auth: "admin", method: "POST", body: { name: name.value.trim() } });
      name.value = "";
      showKeys(`Tenant ${created.name} created`, created, created);
      refresh();
    } catch (error) {
      message.replaceChildren(errorBox(error));
    }
  });
  main.append(create, message, list, panel, forget);
  refresh();
}

function signIn(main, app) {
  const { form, message, input } = keyForm({
    name: "admin-token",
    label: "Admin token",
    hint: "Printed once by the server on its first start, or STATSREMOTE_ADMIN_TOKEN. Kept in this tab only.",
    button: "Sign in as operator",
    title: "Admin sign-in",
    check: (token) => callWith(token, "/admin/v1/tenants"),
    accept: (token) => {
      session.setAdminToken(token);
      app.refresh();
    },
  });
  main.append(form, message);
  input.focus();
}
