// Settings: the optional basemap tile URL and the stale limit (kept in the browser).

import { h } from "../dom";
import { t } from "../i18n";
import { saveSettings, settings } from "../settings";

export function openSettings(): void {
  const basemap = h("input", { id: "settings-basemap", type: "url", value: settings.basemapUrl, placeholder: "https://tiles.example/{z}/{x}/{y}.png" });
  const stale = h("input", { id: "settings-stale", type: "number", min: 2, max: 600, value: settings.staleAfterS });
  const save = h("button", { type: "submit", class: "btn btn-primary" }, t("settings.save"));
  const close = h("button", { type: "button", class: "btn" }, t("settings.close"));
  const form = h(
    "form",
    { class: "settings-form" },
    h("h2", { id: "settings-title" }, t("settings.title")),
    h("label", { for: "settings-basemap" }, t("settings.basemap")),
    basemap,
    h("label", { for: "settings-stale" }, t("settings.staleAfter")),
    stale,
    h("div", { class: "dialog-buttons" }, close, save),
  );
  const dialog = h("dialog", { "aria-labelledby": "settings-title" }, form);
  document.body.appendChild(dialog);
  const done = () => {
    dialog.close();
    dialog.remove();
  };
  close.addEventListener("click", done);
  dialog.addEventListener("cancel", (e) => {
    e.preventDefault();
    done();
  });
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const seconds = Number(stale.value);
    saveSettings({ basemapUrl: basemap.value.trim(), staleAfterS: Number.isFinite(seconds) && seconds >= 2 ? seconds : settings.staleAfterS });
    done();
  });
  dialog.showModal();
  basemap.focus();
}
