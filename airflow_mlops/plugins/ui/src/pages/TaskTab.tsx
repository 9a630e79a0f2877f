/*
 * The "MLOps Report" tab of a task instance: a monitor task's drift check, a validate task's result, and
 * the HTML report the task wrote.
 *
 * The report (HTML with its own scripts) shows in <iframe sandbox="allow-scripts"> without
 * allow-same-origin: it runs in an opaque origin and cannot reach Airflow's cookies, storage or DOM. The
 * server sends the same URL with its own Content-Security-Policy sandbox.
 */
import { Box, Code, Heading, Link, List, Stack, Table, Text } from "@chakra-ui/react";
import type { ReactNode } from "react";

import { apiUrl, appUrl, type Batch, HttpError, seg, type TaskInfo, useJson } from "../api";
import { Empty, ErrorBox, Loading } from "../components/status";
import { modelPath, RouteLink, Score, Time, YesNo } from "../components/values";

type Row = Record<string, unknown>;

const num = (value: unknown): number | null => (typeof value === "number" ? value : null);
const str = (value: unknown): string | null => (value === null || value === undefined ? null : String(value));

const Facts = ({ rows, testId }: { rows: [string, ReactNode][]; testId: string }) => (
  <Table.Root data-testid={testId} maxW="3xl" size="sm" variant="outline">
    <Table.Body>
      {rows.map(([label, value]) => (
        <Table.Row key={label}>
          <Table.Cell fontWeight="bold" verticalAlign="top" w="14rem">
            {label}
          </Table.Cell>
          <Table.Cell>{value}</Table.Cell>
        </Table.Row>
      ))}
    </Table.Body>
  </Table.Root>
);

const DriftSummary = ({ summary }: { summary: Row }) => {
  const window = (summary.window ?? {}) as Row;
  const quality = (summary.quality ?? null) as Row | null;
  const columns = Object.entries((summary.columns ?? {}) as Record<string, Row>);
  const model = str(summary.model);
  const rows: [string, ReactNode][] = [
    ["Dataset drift", <YesNo good={false} key="d" no="no drift" testId="task-drifted" value={Boolean(summary.drift_detected)} yes="drifted" />],
    [
      "Share of drifted columns",
      <span key="s">
        <Score testId="task-drift-share" value={num(summary.drift_share)} /> (drift from <Score testId="task-threshold-share" value={num(summary.threshold_share)} />)
      </span>,
    ],
    [
      "Window",
      <span key="w">
        <Time day iso={str(window.start)} testId="task-window-start" /> – <Time day iso={str(window.end)} testId="task-window-end" />
        {typeof window.rows === "number" ? ` (${window.rows} rows)` : ""}
      </span>,
    ],
  ];
  if (model) {
    rows.unshift([
      "Model",
      <span key="m">
        <RouteLink testId="task-model-link" to={modelPath(model)}>
          {model}
        </RouteLink>
        {summary.model_version ? ` version ${String(summary.model_version)}` : ""}
      </span>,
    ]);
  }
  if (quality) {
    rows.push([
      `Quality (${str(quality.metric) ?? "metric"})`,
      <span key="q">
        <Score testId="task-quality" value={num(quality.value)} /> (holdout <Score testId="task-quality-holdout" value={num(quality.holdout)} />, threshold{" "}
        <Score testId="task-quality-threshold" value={num(quality.threshold)} />)
      </span>,
    ]);
  }
  return (
    <Stack gap={3}>
      <Facts rows={rows} testId="task-summary" />
      {columns.length ? (
        <Table.Root data-testid="task-columns" maxW="3xl" size="sm" striped variant="outline">
          <Table.Header>
            <Table.Row>
              <Table.ColumnHeader>Column</Table.ColumnHeader>
              <Table.ColumnHeader>Method</Table.ColumnHeader>
              <Table.ColumnHeader>Score</Table.ColumnHeader>
              <Table.ColumnHeader>Threshold</Table.ColumnHeader>
              <Table.ColumnHeader>Drifted</Table.ColumnHeader>
            </Table.Row>
          </Table.Header>
          <Table.Body>
            {columns.map(([column, f]) => (
              <Table.Row data-key={column} data-testid="task-column-row" key={column}>
                <Table.Cell>{column}</Table.Cell>
                <Table.Cell fontSize="xs">{str(f.method) ?? "—"}</Table.Cell>
                <Table.Cell>
                  <Score testId="task-column-score" value={num(f.score)} />
                </Table.Cell>
                <Table.Cell>
                  <Score testId="task-column-threshold" value={num(f.threshold)} />
                </Table.Cell>
                <Table.Cell>
                  <YesNo good={false} no="no" testId="task-column-drifted" value={Boolean(f.drifted)} yes="drifted" />
                </Table.Cell>
              </Table.Row>
            ))}
          </Table.Body>
        </Table.Root>
      ) : undefined}
    </Stack>
  );
};

const ValidationSummary = ({ batch }: { batch: Batch }) => (
  <Facts
    rows={[
      ["Batch", <Code key="b" wordBreak="break-all">{batch.batch}</Code>],
      ["Result", <YesNo key="p" no="failed" testId="task-passed" value={batch.passed} yes="passed" />],
      ["Rows", <span data-testid="task-rows" data-value={str(batch.rows) ?? ""} key="r">{str(batch.rows) ?? "—"}</span>],
      ["Expectations evaluated", <span data-testid="task-evaluated" key="e">{str(batch.evaluated) ?? "—"}</span>],
      [
        "Failed expectations",
        batch.failed_expectations.length ? (
          <List.Root data-testid="task-failed" data-value={batch.failed_expectations.length} fontSize="sm" key="f" ps={3}>
            {batch.failed_expectations.map((f, i) => (
              <List.Item data-testid="task-failed-expectation" key={i}>
                <Code fontSize="xs">{f.expectation}</Code>
                {f.column ? ` on ${f.column}` : ""}
                {f.details ? `: ${typeof f.details === "string" ? f.details : JSON.stringify(f.details)}` : ""}
              </List.Item>
            ))}
          </List.Root>
        ) : (
          <span data-testid="task-failed" data-value={0} key="f">
            none
          </span>
        ),
      ],
      ...(batch.read_error ? ([["Read error", <Text color="fg.error" data-testid="task-read-error" key="x">{batch.read_error}</Text>]] as [string, ReactNode][]) : []),
      [
        "Quarantined at",
        batch.quarantined_uri ? (
          <Code data-testid="task-quarantined" data-value={batch.quarantined_uri} key="q" wordBreak="break-all">
            {batch.quarantined_uri}
          </Code>
        ) : (
          <span data-testid="task-quarantined" data-value="" key="q">
            not quarantined
          </span>
        ),
      ],
    ]}
    testId="task-summary"
  />
);

export const TaskTab = ({ dagId, runId, taskId, mapIndex }: { dagId?: string; runId?: string; taskId?: string; mapIndex?: string }) => {
  const index = mapIndex !== undefined && mapIndex !== "" && mapIndex !== "-1" ? `?map_index=${seg(mapIndex)}` : "";
  const url = dagId && runId && taskId ? apiUrl(`tasks/${seg(dagId)}/${seg(runId)}/${seg(taskId)}${index}`) : null;
  const { data, error, loading } = useJson<TaskInfo>(url);
  const notFound = error instanceof HttpError && error.status === 404;
  return (
    <Box data-kind={data?.kind ?? ""} data-testid="mlops-task-tab" p={2}>
      {loading && !data ? <Loading /> : undefined}
      {error && !notFound ? <ErrorBox error={error} testId="task-error" /> : undefined}
      {notFound || (data && !data.kind) ? <Empty testId="task-empty">This task recorded no drift check or validation result.</Empty> : undefined}
      {data?.kind ? (
        <Stack gap={3}>
          <Heading size="md">{data.kind === "drift" ? "Drift check" : "Validation result"}</Heading>
          {data.kind === "drift" ? <DriftSummary summary={data.summary ?? {}} /> : <ValidationSummary batch={data.summary as unknown as Batch} />}
          {data.report_url ? (
            <>
              <Link color="fg.info" data-testid="task-report-link" href={appUrl(data.report_url)} rel="noopener noreferrer" target="_blank">
                Open the report in a new tab
              </Link>
              <iframe
                data-testid="task-report-frame"
                sandbox="allow-scripts"
                src={appUrl(data.report_url)}
                style={{ border: "1px solid var(--chakra-colors-border, #ddd)", borderRadius: 6, height: "75vh", width: "100%" }}
                title={`${data.kind} report`}
              />
            </>
          ) : (
            <Empty testId="task-no-report">No HTML report for this task.</Empty>
          )}
        </Stack>
      ) : undefined}
    </Box>
  );
};
