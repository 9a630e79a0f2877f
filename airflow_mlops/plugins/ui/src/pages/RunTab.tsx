/* The "MLOps Model" tab of a DAG run: the model version the run produced and the gate's verdict. */
import { Box, Heading, Stack, Table, Text } from "@chakra-ui/react";

import { apiUrl, HttpError, type RunInfo, seg, useJson } from "../api";
import { Empty, ErrorBox, Loading } from "../components/status";
import { DecisionBadge, modelPath, RouteLink, RunLink, Score, StageBadge, Time } from "../components/values";

export const RunTab = ({ dagId, runId }: { dagId?: string; runId?: string }) => {
  const url = dagId && runId ? apiUrl(`runs/${seg(dagId)}/${seg(runId)}`) : null;
  const { data, error, loading } = useJson<RunInfo>(url);
  const notFound = error instanceof HttpError && error.status === 404;
  const decision = data?.decision;
  return (
    <Box data-testid="mlops-run-tab" p={2}>
      {loading && !data ? <Loading /> : undefined}
      {error && !notFound ? <ErrorBox error={error} testId="run-error" /> : undefined}
      {notFound || (data && !data.model) ? <Empty testId="run-empty">This run produced no model version.</Empty> : undefined}
      {data?.model ? (
        <Stack gap={3}>
          <Heading size="md">
            Model <RouteLink testId="run-model-link" to={modelPath(data.model)}>{data.model}</RouteLink>
            {data.version ? (
              <>
                {", version "}
                <span data-testid="run-version" data-value={data.version}>
                  {data.version}
                </span>{" "}
                {data.stage ? <StageBadge stage={data.stage} testId="run-stage" /> : undefined}
              </>
            ) : undefined}
          </Heading>
          {data.pending_approval ? (
            <Text data-testid="run-pending" fontWeight="bold">
              Candidate {data.pending_approval.version} waits for approval:{" "}
              <RouteLink to={modelPath(data.model)}>approve or reject it on the model page</RouteLink> or in Airflow's
              Required actions.
            </Text>
          ) : undefined}
          {decision ? (
            <Table.Root data-testid="run-decision" maxW="3xl" size="sm" variant="outline">
              <Table.Body>
                <Table.Row>
                  <Table.Cell fontWeight="bold">Gate's verdict</Table.Cell>
                  <Table.Cell>
                    <DecisionBadge decision={decision.action} testId="run-decision-action" />
                  </Table.Cell>
                </Table.Row>
                <Table.Row>
                  <Table.Cell fontWeight="bold">Candidate score</Table.Cell>
                  <Table.Cell>
                    <Score testId="run-candidate-score" value={decision.candidate_score} />
                  </Table.Cell>
                </Table.Row>
                <Table.Row>
                  <Table.Cell fontWeight="bold">Production score</Table.Cell>
                  <Table.Cell>
                    <Score testId="run-production-score" value={decision.production_score} />
                  </Table.Cell>
                </Table.Row>
                <Table.Row>
                  <Table.Cell fontWeight="bold">Reason</Table.Cell>
                  <Table.Cell data-testid="run-reason">{decision.reason ?? "—"}</Table.Cell>
                </Table.Row>
                <Table.Row>
                  <Table.Cell fontWeight="bold">User</Table.Cell>
                  <Table.Cell data-testid="run-user" data-value={decision.user ?? ""}>
                    {decision.user ?? "automatic"}
                  </Table.Cell>
                </Table.Row>
                <Table.Row>
                  <Table.Cell fontWeight="bold">When</Table.Cell>
                  <Table.Cell>
                    <Time iso={decision.at} testId="run-decision-at" />
                  </Table.Cell>
                </Table.Row>
                {decision.run_id && (decision.dag_id !== dagId || decision.run_id !== runId) ? (
                  <Table.Row>
                    <Table.Cell fontWeight="bold">Decided in</Table.Cell>
                    <Table.Cell>
                      <RunLink dagId={decision.dag_id} runId={decision.run_id} />
                    </Table.Cell>
                  </Table.Row>
                ) : undefined}
              </Table.Body>
            </Table.Root>
          ) : (
            <Empty testId="run-no-decision">No gate decision recorded for this run (yet).</Empty>
          )}
        </Stack>
      ) : undefined}
    </Box>
  );
};
