/* Drift per monitored column over time against its threshold (one small chart per column) and quality. */
import { Box, Heading, SimpleGrid, Text } from "@chakra-ui/react";

import { apiUrl, appUrl, type Drift, seg, useJson } from "../api";
import { LineChart } from "../components/LineChart";
import { Empty, ErrorBox, Loading } from "../components/status";
import { formatDay, Score } from "../components/values";

const when = (p: { at: string; data_interval_start: string | null }): number => Date.parse(p.data_interval_start ?? p.at);

export const DriftSection = ({ model }: { model: string }) => {
  const { data, error, loading } = useJson<Drift>(apiUrl(`models/${seg(model)}/drift`));
  const columns = data?.columns ?? [];
  const quality = (data?.quality ?? []).filter((q) => typeof q.value === "number");
  const qualityThreshold = quality.length ? quality[quality.length - 1].threshold : null;
  const day = (x: number) => formatDay(new Date(x).toISOString());
  return (
    <Box as="section" data-testid="drift-section" mb={6}>
      <Heading mb={2} size="md">
        Drift and quality
      </Heading>
      {error ? <ErrorBox error={error} testId="drift-error" /> : undefined}
      {loading && !data ? <Loading /> : undefined}
      {data && columns.length === 0 && quality.length === 0 ? <Empty testId="drift-empty">No drift check recorded for this model.</Empty> : undefined}
      {data && (columns.length > 0 || quality.length > 0) ? (
        <>
          <Text color="fg.muted" fontSize="sm" mb={2}>
            Per column: the drift score of each check (red: drifted) and the column's threshold (dashed). The
            dataset drifts when the share of drifted columns reaches{" "}
            <Score testId="drift-threshold-share" value={data.threshold_share} />. Click a point for its report.
          </Text>
          {quality.length > 0 ? (
            <Box borderWidth="1px" data-testid="quality-chart-box" mb={3} p={2} rounded="md" w="fit-content">
              <Text fontSize="sm" fontWeight="bold">
                Quality ({quality[quality.length - 1].metric ?? "metric"}), latest{" "}
                <Score testId="quality-latest" value={quality[quality.length - 1].value} />
              </Text>
              <LineChart
                ariaLabel="quality over time"
                points={quality.map((q) => ({
                  flagged: typeof q.threshold === "number" && (q.value as number) < q.threshold,
                  label: `${formatDay(q.data_interval_start ?? q.at)}: ${q.value}`,
                  x: when(q),
                  y: q.value as number,
                }))}
                testId="quality-chart"
                threshold={qualityThreshold}
                width={520}
                xLabel={day}
              />
            </Box>
          ) : undefined}
          <SimpleGrid data-testid="drift-charts" gap={3} minChildWidth="340px">
            {columns.map((column) => {
              const points = column.points.filter((p) => typeof p.score === "number");
              const last = points[points.length - 1];
              const drifted = points.filter((p) => p.drifted).length;
              return (
                <Box borderWidth="1px" data-column={column.column} data-testid="drift-column" key={column.column} p={2} rounded="md">
                  <Text fontSize="sm" fontWeight="bold">
                    {column.column}
                  </Text>
                  <Text color="fg.muted" fontSize="xs">
                    threshold <Score testId="drift-column-threshold" value={column.threshold} />, latest{" "}
                    <Score testId="drift-column-latest" value={last?.score} />, drifted in{" "}
                    <span data-testid="drift-column-drifted-count" data-value={drifted}>
                      {drifted}
                    </span>{" "}
                    of {points.length} checks
                  </Text>
                  <LineChart
                    ariaLabel={`drift of ${column.column} over time`}
                    points={points.map((p) => ({
                      flagged: p.drifted,
                      href: p.report_url ? appUrl(p.report_url) : undefined,
                      label: `${formatDay(p.data_interval_start ?? p.at)}: ${p.score}${p.drifted ? " (drifted)" : ""}`,
                      x: when(p),
                      y: p.score as number,
                    }))}
                    testId="drift-chart"
                    threshold={column.threshold}
                    xLabel={day}
                  />
                </Box>
              );
            })}
          </SimpleGrid>
        </>
      ) : undefined}
    </Box>
  );
};
