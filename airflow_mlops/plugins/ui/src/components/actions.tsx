/*
 * The model page's actions, done through Airflow's own REST API with the user's session: promote and roll
 * back trigger the model's operate DAG; approve and reject answer the train run's human-in-the-loop task.
 * Airflow's auth manager is the gate: its refusal (403) is shown as it comes.
 */
import { Alert, Box, Button, HStack, Text } from "@chakra-ui/react";
import { useCallback, useEffect, useRef, useState } from "react";

import { getDagRun, type PendingApproval, respondHitl, TERMINAL_RUN_STATES, triggerDag } from "../api";
import { describeError } from "./status";
import { RunLink } from "./values";

export interface ActionRequest {
  /** What the button says, e.g. "Promote v3". */
  label: string;
  kind: "promote" | "rollback" | "approve" | "reject";
  version: string | null;
  operateDagId?: string;
  pending?: PendingApproval;
}

type Phase = "confirm" | "sending" | "waiting" | "done" | "error";

interface ActionState {
  request: ActionRequest;
  phase: Phase;
  run?: { dagId: string; runId: string; state: string };
  error?: Error;
}

const POLL_MS = 3000;

/** The action in progress on a page: ask (confirm), send, then follow the run it started until it ends. */
export const useActions = (onSettled: () => void) => {
  const [state, setState] = useState<ActionState | undefined>();
  const timer = useRef<number | undefined>(undefined);
  useEffect(() => () => window.clearTimeout(timer.current), []);

  const follow = useCallback(
    (dagId: string, runId: string) => {
      const poll = () => {
        getDagRun(dagId, runId).then(
          (run) => {
            setState((s) => s && { ...s, run: { dagId, runId, state: run.state } });
            if (TERMINAL_RUN_STATES.has(run.state)) {
              setState((s) => s && { ...s, phase: "done" });
              onSettled();
            } else {
              timer.current = window.setTimeout(poll, POLL_MS);
            }
          },
          () => {
            timer.current = window.setTimeout(poll, POLL_MS);
          },
        );
      };
      onSettled();
      poll();
    },
    [onSettled],
  );

  const ask = useCallback((request: ActionRequest) => {
    window.clearTimeout(timer.current);
    setState({ phase: "confirm", request });
  }, []);
  const cancel = useCallback(() => setState(undefined), []);

  const confirm = useCallback(() => {
    if (!state) {
      return;
    }
    const { request } = state;
    setState({ phase: "sending", request });
    const sent =
      request.kind === "promote" || request.kind === "rollback"
        ? triggerDag(request.operateDagId ?? "", { action: request.kind, version: request.version }).then((run) => ({
            dagId: run.dag_id,
            runId: run.dag_run_id,
            state: run.state,
          }))
        : respondHitl(request.pending as PendingApproval, request.kind === "approve" ? "Approve" : "Reject").then(() => ({
            dagId: (request.pending as PendingApproval).dag_id,
            runId: (request.pending as PendingApproval).run_id,
            state: "running",
          }));
    sent.then(
      (run) => {
        setState({ phase: "waiting", request, run });
        follow(run.dagId, run.runId);
      },
      (error: Error) => setState({ error, phase: "error", request }),
    );
  }, [state, follow]);

  return { ask, cancel, confirm, busy: state !== undefined && ["sending", "waiting"].includes(state.phase), state };
};

const CONFIRM_TEXT: Record<ActionRequest["kind"], (r: ActionRequest) => string> = {
  approve: (r) => `Approve candidate ${r.version} for production? The train run deploys it.`,
  promote: (r) => `Promote version ${r.version} to production? The operate DAG deploys it to the live endpoint.`,
  reject: (r) => `Reject candidate ${r.version}? The train run archives it.`,
  rollback: () => "Roll back to the previous production version? The operate DAG deploys it to the live endpoint.",
};

/** Where the page says what the current action is doing (and what Airflow answered). */
export const ActionStatus = ({ actions }: { actions: ReturnType<typeof useActions> }) => {
  const { state } = actions;
  const box = useRef<HTMLDivElement>(null);
  const phase = state?.phase;
  useEffect(() => {
    // the buttons sit in tables further down the page: bring the question (and the answer) into view
    box.current?.scrollIntoView?.({ behavior: "smooth", block: "nearest" });
  }, [phase]);
  if (!state) {
    return null;
  }
  const { request } = state;
  if (phase === "confirm") {
    return (
      <Box borderColor="border.emphasized" ref={box} borderWidth="1px" data-action={request.kind} data-testid="action-confirm-box" my={2} p={3} rounded="md">
        <Text mb={2}>{CONFIRM_TEXT[request.kind](request)}</Text>
        <HStack>
          <Button colorPalette={request.kind === "reject" ? "red" : "blue"} data-testid="action-confirm" onClick={actions.confirm} size="sm">
            {request.label}
          </Button>
          <Button data-testid="action-cancel" onClick={actions.cancel} size="sm" variant="outline">
            Cancel
          </Button>
        </HStack>
      </Box>
    );
  }
  if (phase === "error") {
    const status = (state.error as { status?: number } | undefined)?.status;
    return (
      <Alert.Root data-action={request.kind} data-status={status ?? ""} ref={box} data-testid="action-error" my={2} status="error">
        <Alert.Indicator />
        <Alert.Content>
          <Alert.Title>{`${request.label}: ${status === 403 ? "refused by Airflow" : "failed"}`}</Alert.Title>
          <Alert.Description>
            {state.error ? describeError(state.error) : ""}
            {status === 403 ? " Your Airflow role does not let you edit this model's DAGs: ask an admin." : ""}
          </Alert.Description>
        </Alert.Content>
      </Alert.Root>
    );
  }
  const run = state.run;
  return (
    <Alert.Root data-action={request.kind} data-phase={phase} ref={box} data-testid="action-result" my={2} status={phase === "done" && run?.state === "failed" ? "error" : phase === "done" ? "success" : "info"}>
      <Alert.Indicator />
      <Alert.Content>
        <Alert.Title>
          {phase === "sending" ? `${request.label}: sending…` : `${request.label}: ${phase === "done" ? "finished" : "accepted by Airflow"}`}
        </Alert.Title>
        {run ? (
          <Alert.Description>
            Run <RunLink dagId={run.dagId} runId={run.runId} testId="action-run-link" />{" "}
            <Text as="span" data-testid="action-run-state" data-value={run.state} fontWeight="bold">
              {run.state}
            </Text>
            {phase === "waiting" ? " (following it…)" : ""}
            {phase === "waiting" && run.state === "queued" ? " Airflow starts it when the DAG is not paused and a slot is free." : ""}
            {phase === "done" && run.state === "failed" ? " — the run failed: its task log says why." : ""}
          </Alert.Description>
        ) : undefined}
      </Alert.Content>
    </Alert.Root>
  );
};
