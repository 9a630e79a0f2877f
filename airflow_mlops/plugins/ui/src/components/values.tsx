/*
 * How values show: scores with 3 decimals (the exact number in `title` and `data-value`, so a test can
 * compare it to the registry's), times in UTC, links inside Airflow's router or to Airflow's URLs.
 */
import { Badge, Link, Text } from "@chakra-ui/react";
import type { ReactNode } from "react";
import { Link as RouterLink } from "react-router-dom";

import { appUrl, seg } from "../api";

const DASH = "—";

/** A score: 3 decimals shown, the exact value in title and data-value. */
export const Score = ({ value, testId }: { value: unknown; testId?: string }) => {
  if (typeof value !== "number" || !Number.isFinite(value)) {
    return (
      <Text as="span" color="fg.muted" data-testid={testId} data-value="">
        {value === null || value === undefined ? DASH : String(value)}
      </Text>
    );
  }
  return (
    <Text as="span" data-testid={testId} data-value={String(value)} fontVariantNumeric="tabular-nums" title={String(value)}>
      {value.toFixed(3)}
    </Text>
  );
};

/** "2025-03-02 14:05" (UTC) of an ISO time; the ISO text in title, data-value and dateTime. */
export const formatTime = (iso: string | null | undefined): string => {
  if (!iso) {
    return DASH;
  }
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) {
    return iso;
  }
  return date.toISOString().slice(0, 16).replace("T", " ");
};

export const formatDay = (iso: string | null | undefined): string => (iso ? formatTime(iso).slice(0, 10) : DASH);

export const Time = ({ iso, testId, day = false }: { iso: string | null | undefined; testId?: string; day?: boolean }) =>
  iso ? (
    <time data-testid={testId} data-value={iso} dateTime={iso} title={`${iso} (UTC)`}>
      {day ? formatDay(iso) : formatTime(iso)}
    </time>
  ) : (
    <Text as="span" color="fg.muted" data-testid={testId} data-value="">
      {DASH}
    </Text>
  );

/** A link inside Airflow's UI (a router path such as "/dags/x/runs/y"). */
export const RouteLink = ({ to, children, testId }: { to: string; children: ReactNode; testId?: string }) => (
  <Link asChild color="fg.info" data-testid={testId}>
    <RouterLink to={to}>{children}</RouterLink>
  </Link>
);

/** A run id in short: "manual__2025-03-02T00:00:00+00:00" -> "manual 2025-03-02 00:00". */
export const shortRun = (runId: string): string => {
  const match = /^([a-z_]+?)__(\d{4}-\d\d-\d\dT\d\d:\d\d)/.exec(runId);
  return match ? `${match[1].replace(/_/g, " ")} ${match[2].replace("T", " ")}` : runId;
};

/** Link to a DAG run's page in Airflow's UI (the run id, shortened, unless children are given; the full
 * id in title and data-value). */
export const RunLink = ({ dagId, runId, testId, children }: { dagId: string | null | undefined; runId: string | null | undefined; testId?: string; children?: ReactNode }) =>
  dagId && runId ? (
    <Link asChild color="fg.info" data-testid={testId} data-value={runId} title={`${dagId} / ${runId}`} whiteSpace="nowrap">
      <RouterLink to={`/dags/${seg(dagId)}/runs/${seg(runId)}`}>{children ?? shortRun(runId)}</RouterLink>
    </Link>
  ) : (
    <Text as="span" color="fg.muted" data-testid={testId}>
      {DASH}
    </Text>
  );

/** Link to a model's page. */
export const modelPath = (name: string): string => `/plugin/mlops-models/${seg(name)}`;

/** A report (relative `mlops/reports/...` URL) opened in a new tab. */
export const ReportLink = ({ url, testId, children = "report" }: { url: string | null | undefined; testId?: string; children?: ReactNode }) =>
  url ? (
    <Link color="fg.info" data-testid={testId} href={appUrl(url)} rel="noopener noreferrer" target="_blank">
      {children}
    </Link>
  ) : (
    <Text as="span" color="fg.muted" data-testid={testId}>
      {DASH}
    </Text>
  );

const STAGE_COLORS: Record<string, string> = {
  production: "green",
  candidate: "blue",
  pending_approval: "orange",
  archived: "gray",
  rejected: "red",
};

const DECISION_COLORS: Record<string, string> = {
  promote: "green",
  approve: "green",
  rollback: "purple",
  reject: "red",
  pending: "orange",
  pending_approval: "orange",
};

export const StageBadge = ({ stage, testId }: { stage: string | null | undefined; testId?: string }) => (
  <Badge colorPalette={STAGE_COLORS[stage ?? ""] ?? "gray"} data-testid={testId} data-value={stage ?? ""}>
    {stage ?? DASH}
  </Badge>
);

export const DecisionBadge = ({ decision, testId }: { decision: string | null | undefined; testId?: string }) => (
  <Badge colorPalette={DECISION_COLORS[decision ?? ""] ?? "gray"} data-testid={testId} data-value={decision ?? ""}>
    {decision ?? DASH}
  </Badge>
);

export const YesNo = ({ value, yes, no, testId, good = true }: { value: boolean | null | undefined; yes: string; no: string; testId?: string; good?: boolean }) =>
  value === null || value === undefined ? (
    <Text as="span" color="fg.muted" data-testid={testId} data-value="">
      {DASH}
    </Text>
  ) : (
    <Badge colorPalette={value === good ? "green" : "red"} data-testid={testId} data-value={String(value)}>
      {value ? yes : no}
    </Badge>
  );

export { DASH };
