import React from 'react';

import { formatBytes, formatDuration, formatPercent } from './format';
import { areaPath, linePath, peak, plotRuns, pointsIn } from './history';
import type { IHistory, IReadings } from './types';

/** The plot's own units: the SVG is stretched to the slot's width. */
const WIDTH = 200;
const HEIGHT = 36;

/** The shortest span plotted, in seconds, while the history is younger than its window. */
export const MIN_SPAN = 30;

/**
 * A slot's utilization (filled) and memory in use (a dashed line) over the
 * server's history window, as an inline SVG. Utilization is out of 100 %
 * (more where a CPU slot used several cores), memory out of what the
 * slot's worker may use. While the server has not yet read for a whole
 * window, the plot spans what it has (at least `MIN_SPAN` seconds), and
 * the legend says how long that is.
 */
export function Sparkline({
  history,
  readings,
  now
}: {
  history: IHistory;
  readings: IReadings | null;
  /** The server's clock, seconds since the epoch: the plot's right edge. */
  now: number;
}): JSX.Element {
  const end = Math.max(now, history.time[history.time.length - 1] ?? now);
  const first = history.time.length > 0 ? history.time[0] : undefined;
  const seconds =
    first === undefined
      ? history.window
      : Math.min(history.window, Math.max(MIN_SPAN, end - first));
  const box = { start: end - seconds, end, width: WIDTH, height: HEIGHT };
  const utilPeak = peak(history.utilization);
  const memPeak = peak(history.memory_used);
  const util = plotRuns(history.time, history.utilization, {
    ...box,
    max: Math.max(100, utilPeak ?? 0)
  });
  const memTotal = readings?.memory_total ?? null;
  const mem = plotRuns(history.time, history.memory_used, {
    ...box,
    max: memTotal !== null && memTotal > 0 ? memTotal : Math.max(1, memPeak ?? 0)
  });
  const points = pointsIn(history, end);
  const span = formatDuration(seconds);
  const peaks = [
    utilPeak === null ? '' : `utilization peaked at ${formatPercent(utilPeak)}`,
    memPeak === null
      ? ''
      : `memory at ${formatBytes(memPeak)}` +
        (memTotal !== null ? ` of ${formatBytes(memTotal)}` : '')
  ].filter(part => part.length > 0);
  const title =
    `Utilization and memory over the last ${span}: ` +
    (points < 2 || peaks.length === 0 ? 'gathering readings…' : `${peaks.join(', ')}.`);
  return (
    <div className="jp-RemoteGpu-sparkBox" title={title}>
      <svg
        className="jp-RemoteGpu-spark"
        viewBox={`0 0 ${WIDTH} ${HEIGHT}`}
        preserveAspectRatio="none"
        role="img"
        aria-label={title}
        data-points={points}
      >
        <path className="jp-RemoteGpu-sparkArea" d={areaPath(util, HEIGHT)} />
        <path className="jp-RemoteGpu-sparkUtil" d={linePath(util)} />
        <path className="jp-RemoteGpu-sparkMem" d={linePath(mem)} />
      </svg>
      <div className="jp-RemoteGpu-sparkLegend">
        <span className="jp-RemoteGpu-sparkKey jp-mod-util">util</span>
        <span className="jp-RemoteGpu-sparkKey jp-mod-mem">mem</span>
        <span className="jp-RemoteGpu-sparkSpan">last {span}</span>
      </div>
    </div>
  );
}
