/* A model's page: versions, decisions, pending approvals and actions, trials, drift, validation. */
import { Box, Button, Heading, HStack, Stack, Table, Text } from "@chakra-ui/react";
import { useLocation } from "react-router-dom";

import { apiUrl, type Decision, type ModelDetail, seg, useJson, type Version } from "../api";
import { ActionStatus, useActions } from "../components/actions";
import { Empty, ErrorBox, Loading } from "../components/status";
import { DecisionBadge, RouteLink, RunLink, Score, StageBadge, Time } from "../components/values";
import { DriftSection } from "./DriftSection";
import { TrialsSection } from "./TrialsSection";
import { ValidationSection } from "./ValidationSection";

/** Stages a person may put in production (the operate DAG refuses a rejected version, and a pending one is
 * approved through its train run). */
const PROMOTABLE = new Set(["candidate", "archived"]);

/** Under a hand decision's scores: they are the versions' validation scores from training, not a holdout's. */
const ScoresFrom = ({ from }: { from?: string | null }) =>
  from === "registration" ? (
    <Text
      color="fg.muted"
      data-testid="decision-scores-from"
      data-value={from}
      fontSize="xs"
      title="A decision by hand scores nothing new: these are the versions' validation scores from their tuning run, not scores on a holdout."
    >
      validation
    </Text>
  ) : undefined;

const Metrics = ({ metrics, main }: { metrics: Record<string, unknown>; main: string }) => {
  const names = Object.keys(metrics ?? {}).sort((a, b) => (a === main ? -1 : b === main ? 1 : a.localeCompare(b)));
  if (names.length === 0) {
    return <Text color="fg.muted">—</Text>;
  }
  return (
    <Stack gap={0} fontSize="xs">
      {names.map((name) => (
        <Box data-metric={name} data-testid="version-metric" key={name}>
          <Text as="span" color="fg.muted">
            {name}
          </Text>{" "}
          <Score value={metrics[name]} />
        </Box>
      ))}
    </Stack>
  );
};

const VersionsTable = ({ detail, actions, showActions }: { detail: ModelDetail; actions: ReturnType<typeof useActions>; showActions: boolean }) => {
  const operate = detail.dag_ids?.operate;
  return (
    <Table.ScrollArea borderWidth="1px" maxH="520px" rounded="md">
      <Table.Root data-testid="versions-table" size="sm" stickyHeader striped>
        <Table.Header>
          <Table.Row>
            <Table.ColumnHeader>Version</Table.ColumnHeader>
            <Table.ColumnHeader>Stage</Table.ColumnHeader>
            <Table.ColumnHeader>Metrics</Table.ColumnHeader>
            <Table.ColumnHeader>Training window</Table.ColumnHeader>
            <Table.ColumnHeader>Produced by</Table.ColumnHeader>
            <Table.ColumnHeader>Registered</Table.ColumnHeader>
            {showActions ? <Table.ColumnHeader>Action</Table.ColumnHeader> : undefined}
          </Table.Row>
        </Table.Header>
        <Table.Body>
          {detail.versions.map((v: Version) => (
            <Table.Row data-key={v.version} data-stage={v.stage} data-testid="versions-row" key={v.version} verticalAlign="top">
              <Table.Cell data-testid="version-id" data-value={v.version} fontWeight={v.stage === "production" ? "bold" : undefined} title={v.tag ?? undefined}>
                {v.version}
              </Table.Cell>
              <Table.Cell>
                <StageBadge stage={v.stage} testId="version-stage" />
              </Table.Cell>
              <Table.Cell>
                <Metrics main={detail.metric} metrics={v.metrics} />
              </Table.Cell>
              <Table.Cell fontSize="xs">
                {v.training_window ? (
                  <>
                    <Time day iso={v.training_window.start} testId="version-window-start" /> –{" "}
                    <Time day iso={v.training_window.end} testId="version-window-end" />
                  </>
                ) : (
                  <Text color="fg.muted">—</Text>
                )}
              </Table.Cell>
              <Table.Cell fontSize="xs">
                <RunLink dagId={v.dag_id} runId={v.run_id} testId="version-run-link" />
              </Table.Cell>
              <Table.Cell fontSize="xs">
                <Time iso={v.registered_at} testId="version-registered" />
              </Table.Cell>
              {showActions ? (
                <Table.Cell>
                  {operate && PROMOTABLE.has(v.stage) ? (
                    <Button
                      data-testid="action-promote"
                      data-version={v.version}
                      disabled={actions.busy}
                      onClick={() => actions.ask({ kind: "promote", label: `Promote ${v.version}`, operateDagId: operate, version: v.version })}
                      size="xs"
                      variant="outline"
                    >
                      Promote
                    </Button>
                  ) : undefined}
                </Table.Cell>
              ) : undefined}
            </Table.Row>
          ))}
        </Table.Body>
      </Table.Root>
    </Table.ScrollArea>
  );
};

const DecisionsTable = ({ decisions }: { decisions: Decision[] }) => (
  <Table.ScrollArea borderWidth="1px" maxH="420px" rounded="md">
    <Table.Root data-testid="decisions-table" size="sm" stickyHeader striped>
      <Table.Header>
        <Table.Row>
          <Table.ColumnHeader>When (newest first)</Table.ColumnHeader>
          <Table.ColumnHeader>Decision</Table.ColumnHeader>
          <Table.ColumnHeader>Version</Table.ColumnHeader>
          <Table.ColumnHeader>Candidate score</Table.ColumnHeader>
          <Table.ColumnHeader>Production score</Table.ColumnHeader>
          <Table.ColumnHeader>Reason</Table.ColumnHeader>
          <Table.ColumnHeader>User</Table.ColumnHeader>
          <Table.ColumnHeader>Run</Table.ColumnHeader>
        </Table.Row>
      </Table.Header>
      <Table.Body>
        {decisions.map((d, i) => (
          <Table.Row data-key={`${d.at ?? ""}/${d.action}/${d.version ?? ""}`} data-testid="decisions-row" key={i} verticalAlign="top">
            <Table.Cell fontSize="xs">
              <Time iso={d.at} testId="decision-at" />
            </Table.Cell>
            <Table.Cell>
              <DecisionBadge decision={d.action} testId="decision-action" />
            </Table.Cell>
            <Table.Cell>
              <span data-testid="decision-version" data-value={d.version ?? ""}>
                {d.version ?? "—"}
              </span>
              {d.previous_production && d.previous_production !== d.version && ["promote", "approve", "rollback"].includes(d.action) ? (
                <Text color="fg.muted" data-testid="decision-previous" data-value={d.previous_production} fontSize="xs">
                  replaced {d.previous_production}
                </Text>
              ) : undefined}
            </Table.Cell>
            <Table.Cell>
              <Score testId="decision-candidate-score" value={d.candidate_score} />
              <ScoresFrom from={d.scores_from} />
            </Table.Cell>
            <Table.Cell>
              <Score testId="decision-production-score" value={d.production_score} />
              <ScoresFrom from={d.scores_from} />
            </Table.Cell>
            <Table.Cell data-testid="decision-reason" fontSize="xs" maxW="md" overflowWrap="anywhere">
              {d.reason ?? "—"}
            </Table.Cell>
            <Table.Cell data-testid="decision-user" data-value={d.user ?? ""}>
              {d.user ?? <Text color="fg.muted">automatic</Text>}
            </Table.Cell>
            <Table.Cell fontSize="xs">
              <RunLink dagId={d.dag_id} runId={d.run_id} testId="decision-run-link" />
            </Table.Cell>
          </Table.Row>
        ))}
      </Table.Body>
    </Table.Root>
  </Table.ScrollArea>
);

const PendingApprovals = ({ detail, actions, showActions }: { detail: ModelDetail; actions: ReturnType<typeof useActions>; showActions: boolean }) => (
  <Box as="section" data-testid="pending-section" mb={6}>
    <Heading mb={2} size="md">
      Waiting for approval
    </Heading>
    {detail.pending_approvals.length === 0 ? (
      <Empty testId="pending-empty">No candidate waits for approval.</Empty>
    ) : (
      <Stack>
        {detail.pending_approvals.map((p) => (
          <HStack borderColor="orange.emphasized" borderWidth="1px" data-key={p.version} data-testid="pending-row" key={`${p.run_id}/${p.task_id}`} p={2} rounded="md">
            <Text>
              Candidate <b data-testid="pending-version">{p.version}</b> from run{" "}
              <RunLink dagId={p.dag_id} runId={p.run_id} testId="pending-run-link" /> waits for a human decision
              {typeof p.candidate_score === "number" ? (
                <>
                  {" "}
                  (scored <Score testId="pending-candidate-score" value={p.candidate_score} />
                  {typeof p.production_score === "number" ? (
                    <>
                      {" "}
                      against production's <Score testId="pending-production-score" value={p.production_score} />
                    </>
                  ) : undefined}
                  )
                </>
              ) : undefined}
              .
            </Text>
            {showActions ? (
              <>
                <Button
                  colorPalette="green"
                  data-testid="action-approve"
                  data-version={p.version}
                  disabled={actions.busy}
                  onClick={() => actions.ask({ kind: "approve", label: `Approve ${p.version}`, pending: p, version: p.version })}
                  size="xs"
                >
                  Approve
                </Button>
                <Button
                  colorPalette="red"
                  data-testid="action-reject"
                  data-version={p.version}
                  disabled={actions.busy}
                  onClick={() => actions.ask({ kind: "reject", label: `Reject ${p.version}`, pending: p, version: p.version })}
                  size="xs"
                  variant="outline"
                >
                  Reject
                </Button>
              </>
            ) : undefined}
          </HStack>
        ))}
      </Stack>
    )}
  </Box>
);

export const ModelPage = ({ name }: { name: string }) => {
  const location = useLocation();
  const { data: detail, error, loading, reload } = useJson<ModelDetail>(apiUrl(`models/${seg(name)}`));
  const actions = useActions(reload);
  // The buttons show to users who may edit the model's DAGs; `?actions=show` shows them to anyone (Airflow
  // still decides: it refuses with 403), which is how a refusal can be seen and tested.
  const forced = new URLSearchParams(location.search).get("actions") === "show";
  const showActions = Boolean(detail && (detail.can_edit || forced));
  const operate = detail?.dag_ids?.operate;
  return (
    <Box data-model={name} data-testid="mlops-model-page" p={2}>
      <HStack justify="space-between" mb={1} wrap="wrap">
        <Heading size="lg">
          <RouteLink to="/plugin/mlops-models">Models</RouteLink> / <span data-testid="model-name">{name}</span>
        </Heading>
        {showActions && operate && detail?.production_version ? (
          <Button
            data-testid="action-rollback"
            disabled={actions.busy}
            onClick={() => actions.ask({ kind: "rollback", label: "Roll back", operateDagId: operate, version: null })}
            size="sm"
            variant="outline"
          >
            Roll back production
          </Button>
        ) : undefined}
      </HStack>
      {error ? <ErrorBox error={error} testId="model-error" /> : undefined}
      {loading && !detail ? <Loading /> : undefined}
      {detail ? (
        <>
          <Text color="fg.muted" fontSize="sm" mb={2}>
            Metric <b data-testid="model-metric">{detail.metric}</b>; in production:{" "}
            <b data-testid="model-production-version" data-value={detail.production_version ?? ""}>
              {detail.production_version ?? "none"}
            </b>
            {Object.entries(detail.dag_ids ?? {}).map(([role, dagId]) => (
              <span key={role}>
                {" · "}
                {role} <RouteLink testId={`model-dag-${role}`} to={`/dags/${seg(dagId)}`}>{dagId}</RouteLink>
              </span>
            ))}
          </Text>
          {!detail.can_edit ? (
            <Text color="fg.muted" data-testid="model-read-only" fontSize="xs" mb={2}>
              Read only: your Airflow role does not let you edit this model's DAGs.
            </Text>
          ) : undefined}
          {showActions && !operate ? (
            <Text color="fg.muted" fontSize="xs" mb={2}>
              This model has no operate DAG: promote and roll back are not available.
            </Text>
          ) : undefined}
          <ActionStatus actions={actions} />
          <PendingApprovals actions={actions} detail={detail} showActions={showActions} />
          <Box as="section" data-testid="versions-section" mb={6}>
            <Heading mb={2} size="md">
              Versions
            </Heading>
            {detail.versions.length ? (
              <VersionsTable actions={actions} detail={detail} showActions={showActions} />
            ) : (
              <Empty testId="versions-empty">No version registered.</Empty>
            )}
          </Box>
          <Box as="section" data-testid="decisions-section" mb={6}>
            <Heading mb={2} size="md">
              Decisions
            </Heading>
            {detail.decisions.length ? (
              <DecisionsTable decisions={[...detail.decisions].reverse()} />
            ) : (
              <Empty testId="decisions-empty">No decision recorded.</Empty>
            )}
          </Box>
        </>
      ) : undefined}
      {/* These load in parallel with the model (their own endpoints) so a slow one does not hold the rest. */}
      <TrialsSection
        model={name}
        runs={(detail?.versions ?? [])
          .filter((v, i, all) => v.dag_id && v.run_id && all.findIndex((w) => w.run_id === v.run_id) === i)
          .map((v) => ({ dagId: v.dag_id as string, runId: v.run_id as string, version: v.version }))}
      />
      <DriftSection model={name} />
      <ValidationSection model={name} />
    </Box>
  );
};
