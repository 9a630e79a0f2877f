/*
 * The airflow-mlops pages as one UMD bundle (dist/main.js) that Airflow's UI imports for its react_apps.
 *
 * Airflow's UI puts its own React, ReactDOM, JSX runtime, React Router, Chakra UI and Emotion on globalThis
 * before it imports a plugin bundle, so the bundle keeps them external: it renders with the host's copies
 * (one React, the host's router context, the host's Chakra theme and colour mode) and stays small.
 */
import { defineConfig } from "vite";

const hostGlobals: Record<string, string> = {
  react: "React",
  "react-dom": "ReactDOM",
  "react/jsx-runtime": "ReactJSXRuntime",
  "react-router-dom": "ReactRouterDOM",
  "@chakra-ui/react": "ChakraUI",
  "@emotion/react": "EmotionReact",
};

export default defineConfig({
  base: "./",
  define: { "process.env.NODE_ENV": JSON.stringify("production") },
  build: {
    outDir: "dist",
    emptyOutDir: true,
    target: "es2020",
    lib: {
      entry: "src/main.tsx",
      name: "AirflowPlugin",
      formats: ["umd"],
      fileName: () => "main.js",
    },
    rollupOptions: {
      external: Object.keys(hostGlobals),
      output: { globals: hostGlobals, exports: "default" },
    },
  },
});
