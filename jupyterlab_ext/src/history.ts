/**
 * A slot's recent readings as SVG paths for its sparkline, with no React: the
 * plot's geometry, tested on its own.
 */

import type { IHistory } from './types';

/** Where a plot's points go: the times and values its box spans. */
export interface IPlotBox {
  /** Seconds since the epoch at the left and right edges. */
  start: number;
  end: number;
  /** The value at the top edge (the bottom is 0). */
  max: number;
  width: number;
  height: number;
}

function round(value: number): number {
  return Math.round(value * 100) / 100;
}

/** A point of a plot, in the box's units (y grows downwards, as in SVG). */
export type PlotPoint = [x: number, y: number];

/**
 * The points of `(time[i], values[i])` in `box`, as runs of known values: a
 * `null` (a reading that failed) ends a run, so the plot shows a gap. Points
 * before `box.start` are left out; values are clamped into the box.
 */
export function plotRuns(
  time: readonly number[],
  values: readonly (number | null)[],
  box: IPlotBox
): PlotPoint[][] {
  const span = box.end - box.start;
  if (!(span > 0) || !(box.max > 0)) {
    return [];
  }
  const runs: PlotPoint[][] = [];
  let run: PlotPoint[] | null = null;
  const n = Math.min(time.length, values.length);
  for (let i = 0; i < n; i++) {
    const t = time[i];
    const v = values[i];
    if (v === null || !Number.isFinite(v) || !Number.isFinite(t) || t < box.start) {
      run = null;
      continue;
    }
    const x = round(Math.min(1, (t - box.start) / span) * box.width);
    const y = round(box.height - Math.min(1, Math.max(0, v / box.max)) * box.height);
    if (run === null) {
      run = [];
      runs.push(run);
    }
    run.push([x, y]);
  }
  return runs;
}

/** An SVG path of `runs` as lines: `M` starts each run. */
export function linePath(runs: readonly PlotPoint[][]): string {
  return runs
    .map(run => run.map(([x, y], i) => `${i ? 'L' : 'M'}${x} ${y}`).join(' '))
    .join(' ');
}

/**
 * An SVG path of the areas under `runs` down to `bottom`, one closed shape
 * per run of two points or more (one reading alone has no area).
 */
export function areaPath(runs: readonly PlotPoint[][], bottom: number): string {
  return runs
    .filter(run => run.length > 1)
    .map(run => {
      const first = run[0][0];
      const last = run[run.length - 1][0];
      return `${linePath([run])} L${last} ${bottom} L${first} ${bottom} Z`;
    })
    .join(' ');
}

/** The largest known value, or `null` if there is none. */
export function peak(values: readonly (number | null)[]): number | null {
  let best: number | null = null;
  for (const v of values) {
    if (v !== null && Number.isFinite(v) && (best === null || v > best)) {
      best = v;
    }
  }
  return best;
}

/** How many readings of the history lie within its window before `end`. */
export function pointsIn(history: IHistory, end: number): number {
  const start = end - history.window;
  return history.time.filter(t => t >= start).length;
}
