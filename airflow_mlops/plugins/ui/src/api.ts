/*
 * Data access: the plugin's JSON API (mlops/api/...) and Airflow's public REST API (api/v2/...).
 *
 * Every URL is built from document.baseURI, never from a leading "/", so the pages work under any
 * [api] base_url. Requests carry the session cookie Airflow's UI logged in with (same origin).
 */
import { useCallback, useEffect, useState } from "react";

export type Iso = string;

export interface Production {
  version: string;
  score: number | null;
}
export interface Serving {
  url: string | null;
  ready: boolean;
  version_answering: string | null;
}
export interface QualitySummary {
  metric: string | null;
  value: number | null;
  holdout: number | null;
  decay: number | null;
  max_decay: number | null;
}
export interface DriftCheck {
  at: Iso;
  data_interval_start: Iso | null;
  drifted: boolean;
  drift_share: number | null;
  quality: QualitySummary | null;
  dag_id?: string | null;
  run_id?: string | null;
}
export interface Retraining {
  dag_id: string;
  run_id: string;
  at: Iso | null;
  decision: string | null;
  reason: string | null;
  version?: string | null;
  user?: string | null;
}
export interface ModelSummary {
  name: string;
  metric: string;
  dag_ids: Record<string, string>;
  production: Production | null;
  serving: Serving | null;
  last_drift_check: DriftCheck | null;
  last_retraining: Retraining | null;
  can_edit: boolean;
}
export interface Version {
  version: string;
  stage: string;
  metrics: Record<string, unknown>;
  training_window: { start: Iso | null; end: Iso | null } | null;
  dag_id: string | null;
  run_id: string | null;
  registered_at: Iso | null;
  tag?: string | null;
}
export interface Decision {
  at: Iso | null;
  action: string;
  version: string | null;
  previous_production?: string | null;
  metric?: string | null;
  candidate_score: number | null;
  production_score: number | null;
  /** "gate": scored on the gate's holdout; "registration": a hand decision, the registered validation scores */
  scores_from?: "gate" | "registration" | null;
  reason: string | null;
  user: string | null;
  dag_id: string | null;
  run_id: string | null;
}
export interface PendingApproval {
  version: string;
  dag_id: string;
  run_id: string;
  task_id: string | null;
  map_index: number | null;
  at?: Iso | null;
  candidate_score?: number | null;
  production_score?: number | null;
}
export interface ModelDetail {
  name: string;
  metric: string;
  dag_ids: Record<string, string>;
  can_edit: boolean;
  production_version: string | null;
  versions: Version[];
  decisions: Decision[];
  pending_approvals: PendingApproval[];
}
export interface Trial {
  trial_id: string;
  params: Record<string, unknown>;
  score: number | null;
  status: string | null;
  best?: boolean;
  error?: string | null;
}
export interface Trials {
  dag_id: string | null;
  run_id: string | null;
  metric: string | null;
  mode: string | null;
  best_trial_id?: string | null;
  trials: Trial[];
  plot_url: string | null;
}
export interface DriftPoint {
  at: Iso;
  data_interval_start: Iso | null;
  score: number | null;
  drifted: boolean;
  run_id: string | null;
  report_url: string | null;
}
export interface DriftColumn {
  column: string;
  threshold: number | null;
  points: DriftPoint[];
}
export interface QualityPoint {
  at: Iso;
  data_interval_start: Iso | null;
  metric: string | null;
  value: number | null;
  holdout?: number | null;
  threshold: number | null;
}
export interface Drift {
  threshold_share: number | null;
  columns: DriftColumn[];
  quality: QualityPoint[];
}
export interface FailedExpectation {
  expectation: string;
  column: string | null;
  details: unknown;
}
export interface Batch {
  batch: string;
  dag_id: string | null;
  run_id: string | null;
  task_id?: string | null;
  at?: Iso | null;
  data_interval_start?: Iso | null;
  rows?: number | null;
  evaluated?: number | null;
  read_error?: string | null;
  passed: boolean;
  failed_expectations: FailedExpectation[];
  quarantined_uri: string | null;
  report_url: string | null;
}
export interface RunInfo {
  model: string | null;
  version: string | null;
  stage?: string | null;
  decision: Decision | null;
  pending_approval: PendingApproval | null;
}
export interface TaskInfo {
  kind: "drift" | "validation" | null;
  summary: Record<string, unknown> | null;
  report_url: string | null;
}

/** An absolute URL for a path relative to Airflow's base URL (document.baseURI). */
export const appUrl = (path: string): string => new URL(path, document.baseURI).href;

/** A path segment, escaped. */
export const seg = (value: string): string => encodeURIComponent(value);

/** The plugin API's URL for `path` (relative to mlops/api/). */
export const apiUrl = (path: string): string => appUrl(`mlops/api/${path}`);

/** A failed HTTP request: the status and what the server said. */
export class HttpError extends Error {
  constructor(
    public readonly status: number,
    public readonly detail: string,
    public readonly url: string,
  ) {
    super(`${status}: ${detail}`);
  }
}

const detailOf = async (response: Response): Promise<string> => {
  const text = await response.text();
  try {
    const body = JSON.parse(text) as { detail?: unknown };
    if (body.detail !== undefined) {
      return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    }
  } catch {
    // not JSON: keep the text
  }
  return text.slice(0, 500) || response.statusText;
};

/** A JSON request with the session cookie; throws HttpError on a non-2xx answer. */
export const request = async <T>(url: string, init: RequestInit = {}): Promise<T> => {
  const response = await fetch(url, {
    credentials: "same-origin",
    ...init,
    headers: { Accept: "application/json", ...(init.body ? { "Content-Type": "application/json" } : {}), ...init.headers },
  });
  if (!response.ok) {
    throw new HttpError(response.status, await detailOf(response), url);
  }
  return (await response.json()) as T;
};

/** Requests started before React renders (see `prefetch`), each used once, by the first reader, while
 * fresh. */
const early = new Map<string, { at: number; answer: Promise<unknown> }>();
const EARLY_MS = 10_000;

/** Start GETting `url` now (when the bundle runs, before Airflow's UI renders the page) so that the page's
 * first render finds its data on the way. */
export const prefetch = (url: string): void => {
  const answer = request(url);
  answer.catch(() => undefined); // the reader sees the error; nobody else should
  early.set(url, { answer, at: Date.now() });
};

const takeEarly = <T>(url: string): Promise<T> | undefined => {
  const found = early.get(url);
  early.delete(url);
  return found && Date.now() - found.at < EARLY_MS ? (found.answer as Promise<T>) : undefined;
};

export interface Loaded<T> {
  data: T | undefined;
  error: HttpError | Error | undefined;
  loading: boolean;
  reload: () => void;
}

/** GET `url` (null: nothing to load) and re-render with its JSON; `reload` fetches again. */
export const useJson = <T>(url: string | null): Loaded<T> => {
  const [state, setState] = useState<{ data?: T; error?: Error; loading: boolean }>({ loading: url !== null });
  const [generation, setGeneration] = useState(0);
  useEffect(() => {
    if (url === null) {
      setState({ loading: false });
      return;
    }
    let live = true;
    setState((previous) => ({ ...previous, loading: true }));
    (takeEarly<T>(url) ?? request<T>(url)).then(
      (data) => live && setState({ data, loading: false }),
      (error: Error) => live && setState({ error, loading: false }),
    );
    return () => {
      live = false;
    };
  }, [url, generation]);
  const reload = useCallback(() => setGeneration((g) => g + 1), []);
  return { data: state.data, error: state.error, loading: state.loading, reload };
};

// ---- Airflow's public REST API (the actions) ----

export interface DagRun {
  dag_id: string;
  dag_run_id: string;
  state: string;
}

/** Trigger a run of `dagId` with `conf` (POST api/v2/dags/<dag>/dagRuns). Airflow answers 403 to users
 * its auth manager does not let edit (trigger) that DAG. */
export const triggerDag = (dagId: string, conf: Record<string, unknown>): Promise<DagRun> =>
  request<DagRun>(appUrl(`api/v2/dags/${seg(dagId)}/dagRuns`), {
    method: "POST",
    body: JSON.stringify({ logical_date: null, conf }),
  });

/** A DAG run's current state. */
export const getDagRun = (dagId: string, runId: string): Promise<DagRun> =>
  request<DagRun>(appUrl(`api/v2/dags/${seg(dagId)}/dagRuns/${seg(runId)}`));

interface HitlDetails {
  hitl_details: { options: string[]; task_instance: { task_id: string; map_index: number | null } }[];
}

/** The approval task waiting in the run of `pending`: the one the registry names, else the run's
 * human-in-the-loop task that has no answer yet (GET .../dagRuns/<run>/hitlDetails). */
const waitingTask = async (pending: PendingApproval): Promise<{ taskId: string; mapIndex: number }> => {
  if (pending.task_id) {
    return { mapIndex: pending.map_index ?? -1, taskId: pending.task_id };
  }
  const url = appUrl(`api/v2/dags/${seg(pending.dag_id)}/dagRuns/${seg(pending.run_id)}/hitlDetails?response_received=false`);
  const found = (await request<HitlDetails>(url)).hitl_details.find((d) => d.options.includes("Approve"));
  if (!found) {
    throw new HttpError(404, `no approval task waits for an answer in run ${pending.run_id} of ${pending.dag_id}`, url);
  }
  return { mapIndex: found.task_instance.map_index ?? -1, taskId: found.task_instance.task_id };
};

/** Answer the approval task of a pending candidate (PATCH .../taskInstances/<task>/<map_index>/hitlDetails)
 * with `option` ("Approve" or "Reject"). */
export const respondHitl = async (pending: PendingApproval, option: string): Promise<unknown> => {
  const { taskId, mapIndex } = await waitingTask(pending);
  return request(
    appUrl(`api/v2/dags/${seg(pending.dag_id)}/dagRuns/${seg(pending.run_id)}/taskInstances/${seg(taskId)}/${mapIndex}/hitlDetails`),
    { method: "PATCH", body: JSON.stringify({ chosen_options: [option], params_input: {} }) },
  );
};

export const TERMINAL_RUN_STATES = new Set(["success", "failed"]);
