/*
 * A small line chart in inline SVG (no chart library): values over x, an optional dashed threshold line,
 * flagged points (drifted, failed) in red. Each point has a <title> tooltip and data attributes.
 */
import { Box } from "@chakra-ui/react";

export interface ChartPoint {
  x: number;
  y: number;
  label: string;
  flagged?: boolean;
  /** Opened in a new tab when the point is clicked (e.g. the check's report). */
  href?: string;
}

interface Props {
  points: ChartPoint[];
  threshold?: number | null;
  testId?: string;
  width?: number;
  height?: number;
  xLabel?: (x: number) => string;
  ariaLabel: string;
  lines?: boolean;
  yMin?: number;
}

const PAD = { bottom: 20, left: 48, right: 8, top: 8 };

const tick = (value: number): string => {
  const magnitude = Math.abs(value);
  return magnitude !== 0 && (magnitude < 0.001 || magnitude >= 1e5) ? value.toExponential(1) : value.toFixed(magnitude < 10 ? 3 : 1);
};

const LABEL = { fontSize: "10px" };

export const LineChart = ({ points, threshold, testId, width = 360, height = 150, xLabel, ariaLabel, lines = true, yMin }: Props) => {
  const xs = points.map((p) => p.x);
  const ys = points.map((p) => p.y).concat(threshold === null || threshold === undefined ? [] : [threshold]);
  let [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  let [y0, y1] = [Math.min(...ys, yMin ?? Infinity), Math.max(...ys)];
  if (!Number.isFinite(x0)) {
    [x0, x1] = [0, 1];
  }
  if (x0 === x1) {
    [x0, x1] = [x0 - 1, x1 + 1];
  }
  if (!Number.isFinite(y0)) {
    [y0, y1] = [0, 1];
  }
  if (y0 === y1) {
    [y0, y1] = [y0 - Math.abs(y0 || 1) * 0.1, y1 + Math.abs(y1 || 1) * 0.1];
  }
  const margin = (y1 - y0) * 0.05;
  [y0, y1] = [y0 - margin, y1 + margin];
  const sx = (x: number) => PAD.left + ((x - x0) / (x1 - x0)) * (width - PAD.left - PAD.right);
  const sy = (y: number) => height - PAD.bottom - ((y - y0) / (y1 - y0)) * (height - PAD.top - PAD.bottom);
  const path = points.map((p, i) => `${i ? "L" : "M"}${sx(p.x).toFixed(1)},${sy(p.y).toFixed(1)}`).join("");
  const axis = "var(--chakra-colors-border-emphasized, #999)";
  const text = "var(--chakra-colors-fg-muted, #666)";
  return (
    <Box as="figure" data-testid={testId} m={0}>
      <svg aria-label={ariaLabel} height={height} role="img" viewBox={`0 0 ${width} ${height}`} width={width}>
        <line stroke={axis} x1={PAD.left} x2={PAD.left} y1={PAD.top} y2={height - PAD.bottom} />
        <line stroke={axis} x1={PAD.left} x2={width - PAD.right} y1={height - PAD.bottom} y2={height - PAD.bottom} />
        <text fill={text} style={LABEL} textAnchor="end" x={PAD.left - 4} y={sy(y1 - margin) + 4}>
          {tick(y1 - margin)}
        </text>
        <text fill={text} style={LABEL} textAnchor="end" x={PAD.left - 4} y={sy(y0 + margin) + 4}>
          {tick(y0 + margin)}
        </text>
        {xLabel && points.length > 0 ? (
          <>
            <text fill={text} style={LABEL} x={PAD.left} y={height - 6}>
              {xLabel(x0)}
            </text>
            <text fill={text} style={LABEL} textAnchor="end" x={width - PAD.right} y={height - 6}>
              {xLabel(x1)}
            </text>
          </>
        ) : undefined}
        {threshold === null || threshold === undefined ? undefined : (
          <line
            data-testid="chart-threshold"
            data-value={String(threshold)}
            stroke="var(--chakra-colors-red-500, #e53e3e)"
            strokeDasharray="4 3"
            x1={PAD.left}
            x2={width - PAD.right}
            y1={sy(threshold)}
            y2={sy(threshold)}
          >
            <title>{`threshold ${threshold}`}</title>
          </line>
        )}
        {lines && points.length > 1 ? <path d={path} fill="none" stroke="var(--chakra-colors-blue-500, #3182ce)" strokeWidth="1.5" /> : undefined}
        {points.map((p, i) => {
          const dot = (
            <circle
              cx={sx(p.x)}
              cy={sy(p.y)}
              data-flagged={p.flagged ? "true" : "false"}
              data-testid="chart-point"
              data-value={String(p.y)}
              fill={p.flagged ? "var(--chakra-colors-red-500, #e53e3e)" : "var(--chakra-colors-blue-500, #3182ce)"}
              key={i}
              r={p.flagged ? 3.5 : 2.5}
            >
              <title>{p.label}</title>
            </circle>
          );
          return p.href ? (
            <a href={p.href} key={i} rel="noopener noreferrer" target="_blank">
              {dot}
            </a>
          ) : (
            dot
          );
        })}
      </svg>
    </Box>
  );
};
