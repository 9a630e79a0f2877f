/* The tuning run's trials: a table sortable by clicking its headers, and the score of each trial. */
import { Box, Heading, HStack, Link, NativeSelect, Table, Text } from "@chakra-ui/react";
import { useMemo, useState } from "react";

import { apiUrl, appUrl, HttpError, seg, type Trial, type Trials, useJson } from "../api";
import { LineChart } from "../components/LineChart";
import { Empty, ErrorBox, Loading } from "../components/status";
import { RunLink, Score, shortRun } from "../components/values";

type Key = { kind: "trial_id" | "status" | "score" } | { kind: "param"; name: string };

const keyId = (key: Key): string => (key.kind === "param" ? `param:${key.name}` : key.kind);

const valueOf = (trial: Trial, key: Key): unknown => (key.kind === "param" ? trial.params?.[key.name] : trial[key.kind]);

const missing = (v: unknown) => v === null || v === undefined || v === "";

/** Order of two cell values: numbers by value, text naturally; `descending` reverses that order, but
 * missing values (a failed trial's score) stay last either way. */
const compare = (a: unknown, b: unknown, descending: boolean): number => {
  if (missing(a) || missing(b)) {
    return missing(a) === missing(b) ? 0 : missing(a) ? 1 : -1;
  }
  const order = typeof a === "number" && typeof b === "number" ? a - b : String(a).localeCompare(String(b), undefined, { numeric: true });
  return descending ? -order : order;
};

const show = (value: unknown): string =>
  value === null || value === undefined ? "—" : typeof value === "object" ? JSON.stringify(value) : String(value);

/** The train runs that registered a version (newest first): the runs whose tuning can be shown. */
export interface TrainRun {
  dagId: string;
  runId: string;
  version: string;
}

export const TrialsSection = ({ model, runs = [] }: { model: string; runs?: TrainRun[] }) => {
  const [chosen, setChosen] = useState<string>(""); // "" = the last tuning run
  const { data, error, loading } = useJson<Trials>(apiUrl(`models/${seg(model)}/trials${chosen ? `?run_id=${seg(chosen)}` : ""}`));
  const [sort, setSort] = useState<{ key: Key; descending: boolean } | undefined>();
  const trials = data?.trials ?? [];
  const paramNames = useMemo(() => [...new Set(trials.flatMap((t) => Object.keys(t.params ?? {})))].sort(), [trials]);
  const columns: { key: Key; title: string }[] = [
    { key: { kind: "trial_id" }, title: "Trial" },
    { key: { kind: "status" }, title: "Status" },
    { key: { kind: "score" }, title: data?.metric ? `Score (${data.metric})` : "Score" },
    ...paramNames.map((name) => ({ key: { kind: "param", name } as Key, title: name })),
  ];
  const rows = useMemo(() => {
    if (!sort) {
      return trials;
    }
    return [...trials].sort((a, b) => compare(valueOf(a, sort.key), valueOf(b, sort.key), sort.descending));
  }, [trials, sort]);
  const notFound = error instanceof HttpError && error.status === 404; // no tuning run recorded
  const scored = trials.map((t, i) => ({ i, t })).filter(({ t }) => typeof t.score === "number");
  const bestId = data?.best_trial_id ?? trials.find((t) => t.best)?.trial_id;
  const best =
    scored.find(({ t }) => bestId !== undefined && t.trial_id === bestId) ??
    (scored.length
      ? scored.reduce((a, b) => ((data?.mode === "min" ? (b.t.score as number) < (a.t.score as number) : (b.t.score as number) > (a.t.score as number)) ? b : a))
      : undefined);

  return (
    <Box as="section" data-testid="trials-section" mb={6}>
      <HStack justify="space-between" mb={2} wrap="wrap">
        <Heading size="md">Tuning trials</Heading>
        {runs.length > 1 ? (
          <NativeSelect.Root maxW="md" size="sm">
            <NativeSelect.Field
              aria-label="Tuning run"
              data-testid="trials-run-select"
              onChange={(event) => {
                setChosen(event.currentTarget.value);
                setSort(undefined);
              }}
              value={chosen}
            >
              <option value="">the last tuning run</option>
              {runs.map((run) => (
                <option key={`${run.dagId}/${run.runId}`} value={run.runId}>
                  {`${shortRun(run.runId)} (${run.version})`}
                </option>
              ))}
            </NativeSelect.Field>
            <NativeSelect.Indicator />
          </NativeSelect.Root>
        ) : undefined}
      </HStack>
      {error && !notFound ? <ErrorBox error={error} testId="trials-error" /> : undefined}
      {loading && !data ? <Loading /> : undefined}
      {notFound || (data && trials.length === 0) ? <Empty testId="trials-empty">{chosen ? "No tuning result in this run." : "No tuning run recorded for this model."}</Empty> : undefined}
      {data && trials.length > 0 ? (
        <>
          <Text color="fg.muted" fontSize="sm" mb={2}>
            Run <RunLink dagId={data.dag_id} runId={data.run_id} testId="trials-run-link" />, {trials.length} trials,{" "}
            {data.mode === "min" ? "lower" : "higher"} is better
            {best ? (
              <>
                ; best <span data-testid="trials-best" data-value={best.t.trial_id}>{best.t.trial_id}</span> (
                <Score value={best.t.score} />)
              </>
            ) : undefined}
            {data.plot_url ? (
              <>
                {" · "}
                <Link color="fg.info" data-testid="trials-plot-link" href={appUrl(data.plot_url)} rel="noopener noreferrer" target="_blank">
                  tuning plot
                </Link>
              </>
            ) : undefined}
          </Text>
          <LineChart
            ariaLabel="score per trial"
            lines={false}
            points={scored.map(({ i, t }) => ({ flagged: t === best?.t, label: `${t.trial_id}: ${t.score}`, x: i + 1, y: t.score as number }))}
            testId="trials-plot"
            width={480}
            xLabel={(x) => `trial ${x}`}
          />
          <Table.ScrollArea borderWidth="1px" maxH="420px" mt={2} rounded="md">
            <Table.Root data-testid="trials-table" size="sm" stickyHeader striped>
              <Table.Header>
                <Table.Row>
                  {columns.map(({ key, title }) => {
                    const active = sort && keyId(sort.key) === keyId(key);
                    return (
                      <Table.ColumnHeader
                        aria-sort={active ? (sort.descending ? "descending" : "ascending") : "none"}
                        cursor="pointer"
                        data-testid={`trials-header-${keyId(key)}`}
                        key={keyId(key)}
                        onClick={() => setSort({ descending: active ? !sort.descending : false, key })}
                        onKeyDown={(event) => {
                          if (event.key === "Enter" || event.key === " ") {
                            event.preventDefault();
                            setSort({ descending: active ? !sort.descending : false, key });
                          }
                        }}
                        tabIndex={0}
                        title="Sort by this column"
                        userSelect="none"
                      >
                        {title} {active ? (sort.descending ? "▼" : "▲") : ""}
                      </Table.ColumnHeader>
                    );
                  })}
                </Table.Row>
              </Table.Header>
              <Table.Body>
                {rows.map((trial) => (
                  <Table.Row data-best={trial.trial_id === best?.t.trial_id ? "true" : "false"} data-key={trial.trial_id} data-testid="trials-row" fontWeight={trial.trial_id === best?.t.trial_id ? "bold" : undefined} key={trial.trial_id}>
                    <Table.Cell data-testid="trial-id">{trial.trial_id}</Table.Cell>
                    <Table.Cell data-testid="trial-status" title={trial.error ?? undefined}>
                      {trial.status ?? "—"}
                    </Table.Cell>
                    <Table.Cell>
                      <Score testId="trial-score" value={trial.score} />
                    </Table.Cell>
                    {paramNames.map((name) => (
                      <Table.Cell data-param={name} data-testid="trial-param" data-value={show(trial.params?.[name])} key={name}>
                        {typeof trial.params?.[name] === "number" && !Number.isInteger(trial.params[name]) ? (
                          <Score value={trial.params[name]} />
                        ) : (
                          show(trial.params?.[name])
                        )}
                      </Table.Cell>
                    ))}
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
