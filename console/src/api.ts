// REST calls to the control API: same origin, the session cookie, and the
// session's CSRF token on every state-changing request.

import type { Me } from "./types";

export class ApiError extends Error {
  readonly status: number;
  readonly code: string;
  readonly body: Record<string, unknown> | null;

  constructor(status: number, code: string, message: string, body: Record<string, unknown> | null) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.body = body;
  }
}

let csrfToken: string | null = null;
const unauthorizedListeners = new Set<() => void>();

export function setCsrfToken(token: string | null): void {
  csrfToken = token;
}

/** Called when a request answers 401 (the session ended): the app shows the login page. */
export function onUnauthorized(fn: () => void): () => void {
  unauthorizedListeners.add(fn);
  return () => unauthorizedListeners.delete(fn);
}

const REQUEST_TIMEOUT_MS = 30_000;

export async function api<T>(
  method: "GET" | "POST" | "PUT" | "PATCH" | "DELETE",
  path: string,
  body?: unknown,
  options: { signal?: AbortSignal; quiet401?: boolean } = {},
): Promise<T> {
  const headers: Record<string, string> = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (method !== "GET" && csrfToken) headers["X-CSRF-Token"] = csrfToken;
  const timeout = AbortSignal.timeout(REQUEST_TIMEOUT_MS);
  const signal = options.signal ? AbortSignal.any([options.signal, timeout]) : timeout;
  let response: Response;
  try {
    response = await fetch(path, {
      method,
      headers,
      credentials: "same-origin",
      body: body === undefined ? null : JSON.stringify(body),
      signal,
    });
  } catch (exc) {
    if (options.signal?.aborted) throw exc;
    const reason = exc instanceof Error ? exc.message : String(exc);
    throw new ApiError(0, "network", `network error: ${reason}`, null);
  }
  if (response.status === 204) return undefined as T;
  const text = await response.text();
  let data: unknown = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!response.ok) {
    const error = (data as { error?: Record<string, unknown> } | null)?.error ?? null;
    const code = typeof error?.["code"] === "string" ? error["code"] : String(response.status);
    const message =
      typeof error?.["message"] === "string" ? error["message"] : `${response.status} ${response.statusText}`;
    if (response.status === 401 && !options.quiet401) {
      sessionEnded();
      for (const fn of unauthorizedListeners) fn();
    }
    throw new ApiError(response.status, code, message, error);
  }
  return data as T;
}

// The session cookie is HttpOnly: the page cannot see whether it has one. A
// hint in localStorage says "this browser signed in": without it the login
// page shows at once instead of asking `/auth/me` for a certain 401.
const SESSION_HINT = "cityops.session";

function setSessionHint(on: boolean): void {
  try {
    if (on) localStorage.setItem(SESSION_HINT, "1");
    else localStorage.removeItem(SESSION_HINT);
  } catch {
    // storage disabled: /auth/me is asked every time
  }
}

function hasSessionHint(): boolean {
  try {
    return localStorage.getItem(SESSION_HINT) === "1";
  } catch {
    return true;
  }
}

export async function login(name: string, password: string): Promise<Me> {
  const me = await api<Me>("POST", "/api/v1/auth/login", { name, password }, { quiet401: true });
  setCsrfToken(me.csrf_token);
  setSessionHint(true);
  return me;
}

/** The signed-in user, or null when there is no session. */
export async function whoAmI(): Promise<Me | null> {
  if (!hasSessionHint()) return null;
  try {
    const me = await api<Me>("GET", "/api/v1/auth/me", undefined, { quiet401: true });
    setCsrfToken(me.csrf_token);
    return me;
  } catch (exc) {
    if (exc instanceof ApiError && exc.status === 401) {
      setSessionHint(false);
      return null;
    }
    throw exc;
  }
}

export async function logout(): Promise<void> {
  try {
    await api<void>("POST", "/api/v1/auth/logout", undefined, { quiet401: true });
  } finally {
    setCsrfToken(null);
    setSessionHint(false);
  }
}

/** Forget the session (a 401 from any request): the login page follows. */
export function sessionEnded(): void {
  setCsrfToken(null);
  setSessionHint(false);
}

/** `?a=1&b=x` from the defined entries (arrays repeat the key). */
export function query(params: Record<string, string | number | boolean | string[] | null | undefined>): string {
  const q = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value === null || value === undefined || value === "") continue;
    if (Array.isArray(value)) for (const v of value) q.append(key, v);
    else q.set(key, String(value));
  }
  const s = q.toString();
  return s ? `?${s}` : "";
}

/** Run `fn` over `items` with at most `limit` at once; results in order. */
export async function mapLimit<T, R>(items: T[], limit: number, fn: (item: T) => Promise<R>): Promise<R[]> {
  const out: R[] = new Array<R>(items.length);
  let next = 0;
  async function worker(): Promise<void> {
    while (next < items.length) {
      const i = next++;
      out[i] = await fn(items[i] as T);
    }
  }
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  return out;
}
