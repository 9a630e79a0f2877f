/*
 * airflow-mlops pages inside Airflow's UI: the entry of the react_apps bundle (dist/main.js).
 *
 * Airflow's UI imports this UMD bundle, then renders globalThis[<react app name>] (or, when unset, the
 * bundle's export, globalThis.AirflowPlugin) with props {dagId, runId, taskId, mapIndex}. One bundle
 * serves the plugin's three react_apps; a module runs once per page load, so it registers a component
 * under each app's name itself (a later app that imports the same, cached, URL finds its name set), and
 * exports a component that picks the page from its props and location for any other name.
 */
import { useLocation } from "react-router-dom";

import { apiUrl, prefetch, seg } from "./api";
import { ModelPage } from "./pages/ModelPage";
import { ModelsPage } from "./pages/ModelsPage";
import { RunTab } from "./pages/RunTab";
import { TaskTab } from "./pages/TaskTab";

interface PluginProps {
  dagId?: string;
  runId?: string;
  taskId?: string;
  mapIndex?: string;
}

/** The react_apps names and url_routes the plugin registers (airflow_mlops/plugins/mlops_plugin.py). */
const MODELS_ROUTE = "mlops-models";
const APP_NAMES = { models: "MLOps Models", run: "MLOps Model", task: "MLOps Report" } as const;

/** Models list at plugin/mlops-models, a model's page at plugin/mlops-models/<model>. */
const ModelsApp = () => {
  const { pathname } = useLocation();
  const marker = `/plugin/${MODELS_ROUTE}/`;
  const at = pathname.indexOf(marker);
  const rest = at >= 0 ? pathname.slice(at + marker.length).replace(/\/+$/, "") : "";
  const name = rest ? decodeURIComponent(rest.split("/")[0]) : "";
  return name ? <ModelPage key={name} name={name} /> : <ModelsPage />;
};

const RunApp = ({ dagId, runId }: PluginProps) => <RunTab dagId={dagId} runId={runId} />;

const TaskApp = (props: PluginProps) => <TaskTab {...props} />;

/** For an app registered under another name: a task tab, a run tab or the models pages. */
const AirflowMLOpsPlugin = (props: PluginProps) => {
  if (props.taskId) {
    return <TaskApp {...props} />;
  }
  if (props.runId) {
    return <RunApp {...props} />;
  }
  return <ModelsApp />;
};

/** The Models pages' data, requested as soon as the bundle runs (Airflow's UI renders the component a
 * little later): the list, or a model's four parts. */
const prefetchModelsPage = () => {
  const base = new URL(document.baseURI).pathname;
  const path = window.location.pathname.startsWith(base) ? window.location.pathname.slice(base.length) : "";
  const match = new RegExp(`^plugin/${MODELS_ROUTE}(?:/([^/]+))?/?$`).exec(path);
  if (!match) {
    return;
  }
  if (!match[1]) {
    prefetch(apiUrl("models"));
    return;
  }
  const model = seg(decodeURIComponent(match[1]));
  for (const part of ["", "/trials", "/drift", "/validation"]) {
    prefetch(apiUrl(`models/${model}${part}`));
  }
};

try {
  prefetchModelsPage();
} catch {
  // only an optimisation: the page fetches what it needs anyway
}

const registry = globalThis as unknown as Record<string, unknown>;
registry[APP_NAMES.models] = ModelsApp;
registry[APP_NAMES.run] = RunApp;
registry[APP_NAMES.task] = TaskApp;

export default AirflowMLOpsPlugin;
