// Severity is shown by colour AND shape AND text, so it reads without colour
// (colour-blind operators, a monochrome projector): critical is an octagon,
// major a triangle, minor a diamond, warning a circle. The same shapes are
// drawn on the map canvas and as inline SVG icons (no icon font needed).

import { h } from "./dom";
import { t, tDynamic } from "./i18n";
import type { AlertState, Severity } from "./types";
import { SEVERITIES } from "./types";

export const SEVERITY_COLOR: Record<Severity, string> = {
  critical: "#ff4d5a",
  major: "#ff9f1a",
  minor: "#f5d547",
  warning: "#5aa9ff",
};

export const PRESENCE_COLOR = {
  online: "#3ecf8e",
  offline: "#9aa0aa",
  stale: "#c58cff",
  unknown: "#66707e",
} as const;

/** 0 is the most severe; unknown severities sort last. */
export function severityRank(severity: string): number {
  const i = (SEVERITIES as readonly string[]).indexOf(severity);
  return i < 0 ? SEVERITIES.length : i;
}

export function severityLabel(severity: Severity): string {
  return t(`severity.${severity}`);
}

export function stateLabel(state: AlertState | string): string {
  return tDynamic(`state.${state}`, state.replace(/_/g, " "));
}

const SVG_NS = "http://www.w3.org/2000/svg";

function shapePoints(severity: Severity, cx: number, cy: number, r: number): [number, number][] {
  const pts: [number, number][] = [];
  if (severity === "critical") {
    for (let i = 0; i < 8; i++) {
      const a = Math.PI / 8 + (i * Math.PI) / 4;
      pts.push([cx + r * Math.cos(a), cy + r * Math.sin(a)]);
    }
  } else if (severity === "major") {
    pts.push([cx, cy - r], [cx + r * 1.05, cy + r * 0.8], [cx - r * 1.05, cy + r * 0.8]);
  } else if (severity === "minor") {
    pts.push([cx, cy - r * 1.1], [cx + r * 1.1, cy], [cx, cy + r * 1.1], [cx - r * 1.1, cy]);
  }
  return pts;
}

/** The severity's shape as a path on a canvas (filled and stroked by the caller). */
export function shapePath(ctx: CanvasRenderingContext2D, severity: Severity, x: number, y: number, r: number): void {
  ctx.beginPath();
  if (severity === "warning") {
    ctx.arc(x, y, r * 0.9, 0, Math.PI * 2);
    return;
  }
  const pts = shapePoints(severity, x, y, r);
  const first = pts[0]!;
  ctx.moveTo(first[0], first[1]);
  for (let i = 1; i < pts.length; i++) ctx.lineTo(pts[i]![0], pts[i]![1]);
  ctx.closePath();
}

/** An inline SVG icon of the severity (decorative: the text label says it too). */
export function severityIcon(severity: Severity, size = 16): SVGSVGElement {
  const svg = document.createElementNS(SVG_NS, "svg");
  svg.setAttribute("width", String(size));
  svg.setAttribute("height", String(size));
  svg.setAttribute("viewBox", "0 0 20 20");
  svg.setAttribute("aria-hidden", "true");
  svg.setAttribute("class", `sev-icon sev-${severity}`);
  let shape: SVGElement;
  if (severity === "warning") {
    shape = document.createElementNS(SVG_NS, "circle");
    shape.setAttribute("cx", "10");
    shape.setAttribute("cy", "10");
    shape.setAttribute("r", "8");
  } else {
    shape = document.createElementNS(SVG_NS, "polygon");
    shape.setAttribute(
      "points",
      shapePoints(severity, 10, severity === "major" ? 11 : 10, 8.5)
        .map(([x, y]) => `${x.toFixed(2)},${y.toFixed(2)}`)
        .join(" "),
    );
  }
  shape.setAttribute("fill", SEVERITY_COLOR[severity]);
  shape.setAttribute("stroke", "#111");
  shape.setAttribute("stroke-width", "1");
  svg.appendChild(shape);
  const mark = document.createElementNS(SVG_NS, "text");
  mark.setAttribute("x", "10");
  mark.setAttribute("y", severity === "major" ? "16" : "14.5");
  mark.setAttribute("text-anchor", "middle");
  mark.setAttribute("font-size", severity === "major" ? "10" : "11");
  mark.setAttribute("font-weight", "700");
  mark.setAttribute("font-family", "DejaVu Sans, Arial, sans-serif");
  mark.setAttribute("fill", "#111");
  mark.textContent = severity === "critical" ? "!" : severity === "major" ? "!" : severity === "minor" ? "·" : "i";
  svg.appendChild(mark);
  return svg;
}

/** Icon and text together: `[⬣] Critical`. */
export function severityBadge(severity: Severity): HTMLElement {
  return h("span", { class: `sev-badge sev-${severity}`, "data-severity": severity }, severityIcon(severity), h("span", { class: "sev-text" }, severityLabel(severity)));
}
