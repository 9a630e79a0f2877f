/* Validation per batch: passed, failed expectations, quarantined batches, the report in a new tab. */
import { Box, Code, Heading, List, Table, Text } from "@chakra-ui/react";

import { apiUrl, type Batch, seg, useJson } from "../api";
import { Empty, ErrorBox, Loading } from "../components/status";
import { ReportLink, RunLink, Time, YesNo } from "../components/values";

const details = (value: unknown): string => (value === null || value === undefined ? "" : typeof value === "string" ? value : JSON.stringify(value));

export const ValidationSection = ({ model }: { model: string }) => {
  const { data, error, loading } = useJson<{ batches: Batch[] }>(apiUrl(`models/${seg(model)}/validation`));
  const batches = data?.batches ?? [];
  const quarantined = batches.filter((b) => b.quarantined_uri).length;
  return (
    <Box as="section" data-testid="validation-section" mb={6}>
      <Heading mb={2} size="md">
        Validation
      </Heading>
      {error ? <ErrorBox error={error} testId="validation-error" /> : undefined}
      {loading && !data ? <Loading /> : undefined}
      {data && batches.length === 0 ? <Empty testId="validation-empty">No validated batch recorded for this model.</Empty> : undefined}
      {batches.length > 0 ? (
        <>
          <Text color="fg.muted" fontSize="sm" mb={2}>
            {batches.length} batches, {batches.filter((b) => !b.passed).length} failed,{" "}
            <span data-testid="validation-quarantined-count" data-value={quarantined}>
              {quarantined}
            </span>{" "}
            quarantined.
          </Text>
          <Table.ScrollArea borderWidth="1px" maxH="480px" rounded="md">
            <Table.Root data-testid="validation-table" size="sm" stickyHeader striped>
              <Table.Header>
                <Table.Row>
                  <Table.ColumnHeader>Batch</Table.ColumnHeader>
                  <Table.ColumnHeader>Validated</Table.ColumnHeader>
                  <Table.ColumnHeader>Result</Table.ColumnHeader>
                  <Table.ColumnHeader>Failed expectations</Table.ColumnHeader>
                  <Table.ColumnHeader>Quarantined at</Table.ColumnHeader>
                  <Table.ColumnHeader>Report</Table.ColumnHeader>
                  <Table.ColumnHeader>Run</Table.ColumnHeader>
                </Table.Row>
              </Table.Header>
              <Table.Body>
                {batches.map((batch) => (
                  <Table.Row data-key={batch.batch} data-testid="validation-row" key={`${batch.batch}/${batch.run_id}/${batch.task_id ?? ""}`} verticalAlign="top">
                    <Table.Cell data-testid="validation-batch" wordBreak="break-all">
                      {batch.batch}
                      {typeof batch.rows === "number" ? (
                        <Text color="fg.muted" data-testid="validation-rows" data-value={batch.rows} fontSize="xs">
                          {batch.rows} rows
                        </Text>
                      ) : undefined}
                    </Table.Cell>
                    <Table.Cell fontSize="xs">
                      <Time iso={batch.at} testId="validation-at" />
                    </Table.Cell>
                    <Table.Cell>
                      <YesNo no="failed" testId="validation-passed" value={batch.passed} yes="passed" />
                    </Table.Cell>
                    <Table.Cell data-testid="validation-failed" data-value={batch.failed_expectations.length}>
                      {batch.read_error ? (
                        <Text color="fg.error" data-testid="validation-read-error" fontSize="xs">
                          {batch.read_error}
                        </Text>
                      ) : undefined}
                      {batch.failed_expectations.length ? (
                        <List.Root fontSize="xs" ps={3}>
                          {batch.failed_expectations.map((f, i) => (
                            <List.Item data-testid="validation-failed-expectation" key={i}>
                              <Code fontSize="xs">{f.expectation}</Code>
                              {f.column ? ` on ${f.column}` : ""}
                              {f.details ? `: ${details(f.details)}` : ""}
                            </List.Item>
                          ))}
                        </List.Root>
                      ) : batch.read_error ? undefined : (
                        <Text color="fg.muted">none</Text>
                      )}
                    </Table.Cell>
                    <Table.Cell data-testid="validation-quarantined" data-value={batch.quarantined_uri ?? ""}>
                      {batch.quarantined_uri ? <Code fontSize="xs" wordBreak="break-all">{batch.quarantined_uri}</Code> : <Text color="fg.muted">—</Text>}
                    </Table.Cell>
                    <Table.Cell>
                      <ReportLink testId="validation-report-link" url={batch.report_url} />
                    </Table.Cell>
                    <Table.Cell>
                      <RunLink dagId={batch.dag_id} runId={batch.run_id} testId="validation-run-link" />
                    </Table.Cell>
                  </Table.Row>
                ))}
              </Table.Body>
            </Table.Root>
          </Table.ScrollArea>
        </>
      ) : undefined}
    </Box>
  );
};
