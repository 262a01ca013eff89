// Hash routes (`#/alerts/abc`): the API serves one index.html at `/`, so the
// page never asks the server for a route it does not know.

export type Route =
  | { name: "overview" }
  | { name: "alerts" }
  | { name: "alert"; id: string }
  | { name: "device"; id: string }
  | { name: "replay" }
  | { name: "notfound"; path: string };

export function parseRoute(hash: string): Route {
  const path = hash.replace(/^#/, "") || "/";
  const parts = path.split("?")[0]!.split("/").filter(Boolean).map(decodeURIComponent);
  if (parts.length === 0 || (parts.length === 1 && parts[0] === "overview")) return { name: "overview" };
  if (parts[0] === "alerts" && parts.length === 1) return { name: "alerts" };
  if (parts[0] === "alerts" && parts.length === 2) return { name: "alert", id: parts[1]! };
  if (parts[0] === "devices" && parts.length === 2) return { name: "device", id: parts[1]! };
  if (parts[0] === "replay" && parts.length === 1) return { name: "replay" };
  return { name: "notfound", path };
}

export function href(route: Route): string {
  switch (route.name) {
    case "overview":
      return "#/";
    case "alerts":
      return "#/alerts";
    case "alert":
      return `#/alerts/${encodeURIComponent(route.id)}`;
    case "device":
      return `#/devices/${encodeURIComponent(route.id)}`;
    case "replay":
      return "#/replay";
    case "notfound":
      return `#${route.path}`;
  }
}

export function navigate(route: Route): void {
  const target = href(route);
  if (location.hash !== target) location.hash = target;
}
