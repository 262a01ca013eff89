// What every view gets: the user, the live connection, and a few app services.

import type { LiveConnection } from "./live";
import type { Me, Permission } from "./types";

export interface AppContext {
  me: Me;
  live: LiveConnection;
  can(permission: Permission): boolean;
  toast(message: string, kind?: "info" | "success" | "error"): void;
  /** Follow the replay sandbox (true) or live data (false). */
  followReplay(on: boolean): void;
}

export interface View {
  readonly el: HTMLElement;
  /** The page title (without the app name). */
  title(): string;
  destroy(): void;
}
