import { defineConfig } from "vite";

// The console is served by the control API from console/dist at "/": relative
// asset URLs keep it working behind a path prefix too. The dev server proxies
// the API (and its websocket) to a running `cityops api` / `cityops up`.
const api = process.env.CITYOPS_API ?? "http://127.0.0.1:8080";

export default defineConfig({
  base: "./",
  build: {
    outDir: "dist",
    emptyOutDir: true,
    sourcemap: true,
    target: "es2022",
    chunkSizeWarningLimit: 400,
  },
  server: {
    proxy: {
      "/api": { target: api, ws: true, changeOrigin: false },
    },
  },
});
