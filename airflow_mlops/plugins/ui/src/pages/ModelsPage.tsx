/* The Models page (navigation "MLOps Models"): one row per registered model. */
import { Box, Heading, Link, Stack, Table, Text } from "@chakra-ui/react";

import { apiUrl, type ModelSummary, useJson } from "../api";
import { Empty, ErrorBox, Loading } from "../components/status";
import { DecisionBadge, modelPath, RouteLink, RunLink, Score, Time, YesNo } from "../components/values";

const Serving = ({ serving }: { serving: ModelSummary["serving"] }) =>
  serving ? (
    <Stack gap={0}>
      {serving.url ? (
        <Link color="fg.info" data-testid="model-serving-url" href={serving.url} rel="noopener noreferrer" target="_blank">
          {serving.url}
        </Link>
      ) : (
        <Text data-testid="model-serving-url">—</Text>
      )}
      <Box>
        <YesNo no="not ready" testId="model-serving-ready" value={serving.ready} yes="ready" />{" "}
        <Text as="span" data-testid="model-serving-version" data-value={serving.version_answering ?? ""}>
          {serving.version_answering ? `answering ${serving.version_answering}` : "no version answering"}
        </Text>
      </Box>
    </Stack>
  ) : (
    <Text color="fg.muted" data-testid="model-serving-url">
      not served
    </Text>
  );

const Drift = ({ check }: { check: ModelSummary["last_drift_check"] }) =>
  check ? (
    <Stack gap={0}>
      <Box>
        <YesNo good={false} no="no drift" testId="model-drift-drifted" value={check.drifted} yes="drifted" />{" "}
        <Text as="span" fontSize="sm">
          share <Score testId="model-drift-share" value={check.drift_share} />
        </Text>
      </Box>
      <Text fontSize="sm">
        {check.quality?.metric ?? "quality"} <Score testId="model-drift-quality" value={check.quality?.value} />
        {typeof check.quality?.holdout === "number" ? (
          <Text as="span" color="fg.muted" fontSize="xs">
            {" "}
            (holdout <Score testId="model-drift-holdout" value={check.quality.holdout} />)
          </Text>
        ) : undefined}
      </Text>
      <Text color="fg.muted" fontSize="xs">
        {check.dag_id && check.run_id ? (
          <RunLink dagId={check.dag_id} runId={check.run_id} testId="model-drift-run">
            <Time iso={check.at} testId="model-drift-at" />
          </RunLink>
        ) : (
          <Time iso={check.at} testId="model-drift-at" />
        )}
        {check.data_interval_start ? (
          <>
            {" "}
            (data of <Time day iso={check.data_interval_start} testId="model-drift-interval" />)
          </>
        ) : undefined}
      </Text>
    </Stack>
  ) : (
    <Text color="fg.muted" data-testid="model-drift-drifted">
      never checked
    </Text>
  );

const Retraining = ({ last }: { last: ModelSummary["last_retraining"] }) =>
  last ? (
    <Stack gap={0}>
      <Box>
        <DecisionBadge decision={last.decision} testId="model-retraining-decision" />{" "}
        {last.version ? (
          <Text as="span" data-testid="model-retraining-version" data-value={last.version} fontSize="sm">
            {last.version}{" "}
          </Text>
        ) : undefined}
        <RunLink dagId={last.dag_id} runId={last.run_id} testId="model-retraining-run">
          run
        </RunLink>
      </Box>
      {last.user ? (
        <Text data-testid="model-retraining-user" data-value={last.user} fontSize="xs">
          by {last.user}
        </Text>
      ) : undefined}
      {last.reason ? (
        <Text data-testid="model-retraining-reason" fontSize="xs" maxW="sm">
          {last.reason}
        </Text>
      ) : undefined}
      <Text color="fg.muted" fontSize="xs">
        <Time iso={last.at} testId="model-retraining-at" />
      </Text>
    </Stack>
  ) : (
    <Text color="fg.muted" data-testid="model-retraining-decision">
      none
    </Text>
  );

export const ModelsPage = () => {
  const { data, error, loading } = useJson<{ models: ModelSummary[] }>(apiUrl("models"));
  return (
    <Box data-testid="mlops-models-page" p={2}>
      <Heading mb={3} size="lg">
        Models
      </Heading>
      {error ? <ErrorBox error={error} testId="models-error" /> : undefined}
      {loading && !data ? <Loading /> : undefined}
      {data && data.models.length === 0 ? (
        <Empty testId="models-empty">No registered model you may read yet: a train DAG run registers one.</Empty>
      ) : undefined}
      {data && data.models.length > 0 ? (
        <Table.ScrollArea borderWidth="1px" rounded="md">
          <Table.Root data-testid="models-table" size="sm" striped>
            <Table.Header>
              <Table.Row>
                <Table.ColumnHeader>Model</Table.ColumnHeader>
                <Table.ColumnHeader>Production version</Table.ColumnHeader>
                <Table.ColumnHeader>Holdout score</Table.ColumnHeader>
                <Table.ColumnHeader>Serving</Table.ColumnHeader>
                <Table.ColumnHeader>Last drift check</Table.ColumnHeader>
                <Table.ColumnHeader>Last retraining</Table.ColumnHeader>
              </Table.Row>
            </Table.Header>
            <Table.Body>
              {data.models.map((model) => (
                <Table.Row data-key={model.name} data-testid="models-row" key={model.name} verticalAlign="top">
                  <Table.Cell>
                    <RouteLink testId="model-link" to={modelPath(model.name)}>
                      {model.name}
                    </RouteLink>
                  </Table.Cell>
                  <Table.Cell data-testid="model-production-version" data-value={model.production?.version ?? ""}>
                    {model.production?.version ?? <Text color="fg.muted">none</Text>}
                  </Table.Cell>
                  <Table.Cell>
                    <Score testId="model-production-score" value={model.production?.score} />{" "}
                    <Text as="span" color="fg.muted" fontSize="xs">
                      {model.metric}
                    </Text>
                  </Table.Cell>
                  <Table.Cell>
                    <Serving serving={model.serving} />
                  </Table.Cell>
                  <Table.Cell>
                    <Drift check={model.last_drift_check} />
                  </Table.Cell>
                  <Table.Cell>
                    <Retraining last={model.last_retraining} />
                  </Table.Cell>
                </Table.Row>
              ))}
            </Table.Body>
          </Table.Root>
        </Table.ScrollArea>
      ) : undefined}
      <Text color="fg.muted" fontSize="xs" mt={2}>
        Times in UTC. Scores show 3 decimals; hover for the exact value.
      </Text>
    </Box>
  );
};
