/*
 * The "MLOps Report" tab of a task instance: a monitor task's drift report, a validate task's result.
 *
 * The report (HTML a task wrote, with its own scripts) shows in <iframe sandbox="allow-scripts"> without
 * allow-same-origin: it runs in an opaque origin and cannot reach Airflow's cookies, storage or DOM. The
 * server adds its own Content-Security-Policy sandbox to the same URL.
 */
import { Box, Heading, Link, Stack, Table, Text } from "@chakra-ui/react";

import { apiUrl, appUrl, HttpError, seg, type TaskInfo, useJson } from "../api";
import { Empty, ErrorBox, Loading } from "../components/status";
import { Score, YesNo } from "../components/values";

const isScore = (key: string, value: unknown) => typeof value === "number" && !Number.isInteger(value) && key !== "";

const Value = ({ name, value }: { name: string; value: unknown }) => {
  if (typeof value === "boolean") {
    return <YesNo good={!/drift|fail/i.test(name)} no="no" testId={`task-summary-${name}`} value={value} yes="yes" />;
  }
  if (isScore(name, value)) {
    return <Score testId={`task-summary-${name}`} value={value} />;
  }
  if (value !== null && typeof value === "object") {
    return (
      <Text as="pre" data-testid={`task-summary-${name}`} fontSize="xs" whiteSpace="pre-wrap">
        {JSON.stringify(value, null, 1)}
      </Text>
    );
  }
  return (
    <span data-testid={`task-summary-${name}`} data-value={value === null || value === undefined ? "" : String(value)}>
      {value === null || value === undefined ? "—" : String(value)}
    </span>
  );
};

export const TaskTab = ({ dagId, runId, taskId, mapIndex }: { dagId?: string; runId?: string; taskId?: string; mapIndex?: string }) => {
  const index = mapIndex && mapIndex !== "-1" ? `?map_index=${seg(mapIndex)}` : "";
  const url = dagId && runId && taskId ? apiUrl(`tasks/${seg(dagId)}/${seg(runId)}/${seg(taskId)}${index}`) : null;
  const { data, error, loading } = useJson<TaskInfo>(url);
  const notFound = error instanceof HttpError && error.status === 404;
  const summary = data?.summary ?? {};
  return (
    <Box data-kind={data?.kind ?? ""} data-testid="mlops-task-tab" p={2}>
      {loading && !data ? <Loading /> : undefined}
      {error && !notFound ? <ErrorBox error={error} testId="task-error" /> : undefined}
      {notFound || (data && !data.kind) ? <Empty testId="task-empty">This task wrote no drift report or validation result.</Empty> : undefined}
      {data?.kind ? (
        <Stack gap={3}>
          <Heading size="md">{data.kind === "drift" ? "Drift check" : "Validation result"}</Heading>
          {Object.keys(summary).length ? (
            <Table.Root data-testid="task-summary" maxW="3xl" size="sm" variant="outline">
              <Table.Body>
                {Object.entries(summary).map(([key, value]) => (
                  <Table.Row data-key={key} key={key}>
                    <Table.Cell fontWeight="bold" verticalAlign="top">
                      {key.replace(/_/g, " ")}
                    </Table.Cell>
                    <Table.Cell>
                      <Value name={key} value={value} />
                    </Table.Cell>
                  </Table.Row>
                ))}
              </Table.Body>
            </Table.Root>
          ) : undefined}
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
