// The dashboard's shell: sign-in with a read key, navigation between views, and the router.
// A view is a module with `title` and `render(main, params, app)`, which may return a function
// that stops it (closes sockets, removes charts). Adding a view is one line in VIEWS (and one
// in the server's list of embedded files).

import { callWith, session } from "./api.js";
import { h, keyForm } from "./ui.js";
import * as live from "./views/live.js";
import * as series from "./views/series.js";
import * as top from "./views/top.js";
import * as funnel from "./views/funnel.js";
import { deadLetters, schemas, segments } from "./views/data.js";
import * as admin from "./views/admin.js";

/** Route, view and whether it needs the tenant's read key (admin has its own token). */
const VIEWS = [
  ["live", live, true],
  ["series", series, true],
  ["top", top, true],
  ["funnel", funnel, true],
  ["segments", segments, true],
  ["deadletters", deadLetters, true],
  ["schemas", schemas, true],
  ["admin", admin, false],
];

const main = document.getElementById("main");
const nav = document.getElementById("nav");
const who = document.getElementById("who");
const menu = document.getElementById("menu");
let stop = null;

const app = {
  /** Keeps `readKey` for this tab and opens the live view. */
  signIn(readKey, tenant) {
    session.signIn(readKey, tenant);
    if (location.hash === "#/live") route();
    else location.hash = "#/live";
  },
  refresh: () => route(),
};

function current() {
  const [path, search] = location.hash.replace(/^#\/?/, "").split("?");
  return { path: path || "live", params: new URLSearchParams(search || "") };
}

function renderNav(active) {
  const signedIn = Boolean(session.readKey);
  nav.replaceChildren(h("ul", {}, VIEWS
    .filter(([, , needsKey]) => signedIn || !needsKey)
    .map(([path, view]) => h("li", {}, h("a", {
      href: `#/${path}`,
      "aria-current": path === active ? "page" : null,
    }, view.title)))));
  const tenant = session.tenant;
  who.replaceChildren(
    signedIn && tenant ? h("span", { class: "tenant" }, "Tenant: ", h("strong", {}, tenant.name)) : null,
    signedIn ? h("button", { type: "button", class: "quiet", onclick: signOut }, "Sign out") : null,
  );
}

function signOut() {
  session.signOut();
  location.hash = "#/live";
  route();
}

function signInForm() {
  const { form, message, input } = keyForm({
    name: "read-key",
    label: "Read key",
    hint: "The tenant's read key (sr_read_…). It stays in this browser tab and is never put in a URL.",
    button: "Sign in",
    title: "Sign in",
    check: (key) => callWith(key, "/v1/tenant"),
    accept: (key, tenant) => app.signIn(key, tenant),
  });
  main.append(
    h("h1", {}, "Sign in"),
    h("p", {}, "Look at a tenant's events as they arrive, their series, top events and funnels."),
    form, message,
    h("p", {}, "Operators: ", h("a", { href: "#/admin" }, "sign in with the admin token"), " to manage tenants."));
  input.focus();
}

function route() {
  if (stop) {
    stop();
    stop = null;
  }
  main.replaceChildren();
  const { path, params } = current();
  const entry = VIEWS.find(([p]) => p === path);
  renderNav(entry ? path : null);
  nav.classList.remove("open");
  menu.setAttribute("aria-expanded", "false");
  if (!entry) {
    main.append(h("h1", {}, "Not found"), h("p", {}, "No such view. ", h("a", { href: "#/live" }, "Go to the live view.")));
    return;
  }
  const [, view, needsKey] = entry;
  document.title = `${view.title} · StatsRemote`;
  if (needsKey && !session.readKey) {
    signInForm();
    return;
  }
  stop = view.render(main, params, app) || null;
}

menu.addEventListener("click", () => {
  const open = nav.classList.toggle("open");
  menu.setAttribute("aria-expanded", String(open));
});
window.addEventListener("hashchange", () => {
  route();
  // Keyboard and screen-reader users land on the new view, unless it focused a field itself.
  if (!main.contains(document.activeElement)) main.focus({ preventScroll: true });
});
route();
