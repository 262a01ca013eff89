// Entry point: who is signed in? The login page, or the console.

import "uplot/dist/uPlot.min.css";
import "./styles.css";

import { ApiError, login, whoAmI } from "./api";
import { startApp } from "./app";
import type { App } from "./app";
import { unlockAudio } from "./audio";
import { h, replaceChildren } from "./dom";
import { currentLanguage, onLanguageChange, setLanguage, t } from "./i18n";
import type { Language } from "./i18n";
import type { Me } from "./types";

const root = document.getElementById("app")!;
document.documentElement.lang = currentLanguage();
let app: App | null = null;

async function boot(): Promise<void> {
  root.setAttribute("aria-busy", "true");
  let me: Me | null;
  try {
    me = await whoAmI();
  } catch (exc) {
    showError(exc);
    return;
  }
  if (me) await enter(me);
  else showLogin();
}

async function enter(me: Me): Promise<void> {
  try {
    app = await startApp(root, me, () => {
      app?.stop();
      app = null;
      showLogin();
    });
    root.removeAttribute("aria-busy");
  } catch (exc) {
    showError(exc);
  }
}

function showError(exc: unknown): void {
  const message = exc instanceof Error ? exc.message : String(exc);
  const retry = h("button", { type: "button", class: "btn btn-primary" }, t("app.retry"));
  retry.addEventListener("click", () => void boot());
  replaceChildren(root, h("main", { class: "page page-message" }, h("p", { role: "alert" }, t("app.error", { message })), retry));
  root.removeAttribute("aria-busy");
}

function showLogin(): void {
  document.title = `${t("login.submit")} — cityops`;
  const name = h("input", { id: "login-name", name: "username", autocomplete: "username", required: true, maxlength: 64 });
  const password = h("input", { id: "login-password", name: "password", type: "password", autocomplete: "current-password", required: true });
  const error = h("p", { class: "form-error", role: "alert", id: "login-error" });
  const submit = h("button", { type: "submit", class: "btn btn-primary" }, t("login.submit"));
  const lang = h("select", { id: "login-lang", "aria-label": t("lang.label") }, h("option", { value: "en" }, "English"), h("option", { value: "ja" }, "日本語"));
  lang.value = currentLanguage();
  lang.addEventListener("change", () => setLanguage(lang.value as Language));
  const form = h(
    "form",
    { class: "login-form", "aria-labelledby": "login-title", novalidate: true },
    h("h1", { id: "login-title" }, t("login.title")),
    h("label", { for: "login-name" }, t("login.name")),
    name,
    h("label", { for: "login-password" }, t("login.password")),
    password,
    error,
    submit,
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    unlockAudio(); // a user gesture: the alert tone may play later
    if (!name.value.trim() || !password.value) {
      error.textContent = t("login.failed");
      return;
    }
    submit.disabled = true;
    submit.textContent = t("login.busy");
    error.textContent = "";
    login(name.value.trim(), password.value)
      .then((me) => {
        unsubscribe();
        return enter(me);
      })
      .catch((exc: unknown) => {
        submit.disabled = false;
        submit.textContent = t("login.submit");
        if (exc instanceof ApiError && exc.status === 401) error.textContent = t("login.failed");
        else if (exc instanceof ApiError && exc.status === 429)
          error.textContent = t("login.rateLimited", { message: exc.message });
        else error.textContent = t("login.error", { message: exc instanceof Error ? exc.message : String(exc) });
        password.select();
      });
  });
  replaceChildren(
    root,
    h("main", { class: "login-page" }, h("div", { class: "login-card" }, h("div", { class: "login-brand" }, h("span", { class: "logo", "aria-hidden": "true" }, "◆"), " cityops"), form, h("div", { class: "login-lang" }, lang))),
  );
  root.removeAttribute("aria-busy");
  const unsubscribe = onLanguageChange(() => {
    unsubscribe();
    showLogin();
  });
  name.focus();
}

void boot();
