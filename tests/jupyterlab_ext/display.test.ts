// What the sidebar draws, without a browser: the middle-cut URL, notebook
// names, the history plot's geometry, and a slot rendered to HTML by React.
// Run with `npm test` in jupyterlab_ext/ (test_lab_model.py does that).

import React from 'react';
import { renderToStaticMarkup } from 'react-dom/server';

import { baseName, slotsTitle, splitMiddle, splitName } from '../../jupyterlab_ext/src/format';
import {
  areaPath,
  linePath,
  peak,
  plotRuns,
  pointsIn
} from '../../jupyterlab_ext/src/history';
import { SlotView } from '../../jupyterlab_ext/src/slots';
import { MIN_SPAN, Sparkline } from '../../jupyterlab_ext/src/sparkline';
import type { IHistory, ISlot } from '../../jupyterlab_ext/src/types';

describe('splitMiddle', () => {
  it('keeps the end of a long URL whole and lets its head shrink', () => {
    const url = 'wss://gpu-node-17.cluster.example.org:8765';
    const [head, tail] = splitMiddle(url);
    expect(head + tail).toBe(url);
    expect(tail).toBe('xample.org:8765'.slice(-14));
    expect(tail.endsWith(':8765')).toBe(true);
  });

  it('splits a short text at most in half', () => {
    expect(splitMiddle('ws://h:1')).toEqual(['ws:/', '/h:1']);
    expect(splitMiddle('')).toEqual(['', '']);
    expect(splitMiddle('abc', 14)).toEqual(['ab', 'c']);
  });
});

describe('baseName', () => {
  it('names a notebook by its file name, on any OS', () => {
    expect(baseName('/home/alice/work/train model.ipynb')).toBe('train model.ipynb');
    expect(baseName('C:\\Users\\bob\\nb.ipynb')).toBe('nb.ipynb');
    expect(baseName('nb.ipynb')).toBe('nb.ipynb');
    expect(baseName('dir/')).toBe('dir');
    expect(baseName('/')).toBe('/');
  });
});

describe('splitName', () => {
  it('keeps what tells new notebooks apart in view: their number and extension', () => {
    expect(splitName('Untitled12.ipynb')).toEqual(['Untitled', '12.ipynb']);
    expect(splitName('Untitled3.ipynb')).toEqual(['Untitled', '3.ipynb']);
    const [head, tail] = splitName('experiment-2026-12-06-resnet50.ipynb');
    expect(head + tail).toBe('experiment-2026-12-06-resnet50.ipynb');
    expect(tail).toBe('et50.ipynb');
  });
});

describe('slotsTitle', () => {
  it('says what the slots are', () => {
    expect(slotsTitle(['gpu', 'gpu'])).toBe('GPUs');
    expect(slotsTitle(['cpu', 'cpu'])).toBe('CPU slots');
    expect(slotsTitle(['gpu', 'cpu'])).toBe('Slots');
    expect(slotsTitle([])).toBe('Slots');
  });
});

describe('plot geometry', () => {
  const box = { start: 100, end: 200, max: 100, width: 200, height: 40 };

  it('maps time to x and value to y, from the bottom up', () => {
    const runs = plotRuns([100, 150, 200], [0, 50, 100], box);
    expect(runs).toEqual([[[0, 40], [100, 20], [200, 0]]]);
    expect(linePath(runs)).toBe('M0 40 L100 20 L200 0');
    expect(areaPath(runs, 40)).toBe('M0 40 L100 20 L200 0 L200 40 L0 40 Z');
  });

  it('leaves a gap where a reading failed and drops what is before the window', () => {
    const runs = plotRuns([50, 110, 120, 130, 140, 150], [9, 10, null, 30, 40, 50], box);
    expect(runs).toEqual([[[20, 36]], [[60, 28], [80, 24], [100, 20]]]);
    expect(linePath(runs)).toBe('M20 36 M60 28 L80 24 L100 20');
    // A lone point has no area.
    expect(areaPath(runs, 40)).toBe('M60 28 L80 24 L100 20 L100 40 L60 40 Z');
  });

  it('clamps values outside the box and draws nothing for an empty box', () => {
    expect(plotRuns([100, 200], [-5, 250], box)).toEqual([[[0, 40], [200, 0]]]);
    expect(plotRuns([100], [1], { ...box, end: 100 })).toEqual([]);
    expect(plotRuns([100], [1], { ...box, max: 0 })).toEqual([]);
  });

  it('finds the peak and counts the points in the window', () => {
    expect(peak([null, 3, 7, null, 5])).toBe(7);
    expect(peak([null])).toBeNull();
    const history: IHistory = { window: 60, time: [0, 50, 100], utilization: [1, 2, 3], memory_used: [1, 2, 3] };
    expect(pointsIn(history, 100)).toBe(2);
  });
});

function slot(overrides: Partial<ISlot> = {}): ISlot {
  const gib = 1024 ** 3;
  return {
    id: 'cpu0',
    kind: 'cpu',
    name: 'CPU slot 0',
    uuid: '',
    healthy: true,
    pool: 'default',
    readings: {
      utilization: 55,
      memory_used: gib,
      memory_total: 8 * gib,
      host_memory_total: 32 * gib,
      temperature: null,
      power: null,
      processes: [{ pid: 1, memory: gib }]
    },
    history: {
      window: 300,
      time: [1000, 1003, 1006],
      utilization: [10, 90, 55],
      memory_used: [gib, 2 * gib, gib]
    },
    holder: {
      user: 'alice',
      since: 990,
      mine: true,
      session: 's1',
      notebook: '/home/alice/work/train.ipynb'
    },
    ...overrides
  };
}

describe('SlotView', () => {
  it('measures a CPU slot against its share and says so on hover', () => {
    const html = renderToStaticMarkup(
      React.createElement(SlotView, { slot: slot(), serverTime: 1006 })
    );
    expect(html).toContain('1.0 GiB / 8.0 GiB');
    expect(html).toContain(
      'the worker uses 1.0 GiB of its share, 8.0 GiB (the host&#x27;s 32.0 GiB shared by 4 CPU slots)'
    );
    expect(html).toContain('width:13%');
  });

  it('names the notebook that holds it, with the path on hover', () => {
    const html = renderToStaticMarkup(
      React.createElement(SlotView, { slot: slot(), serverTime: 1006 })
    );
    expect(html).toContain('title="/home/alice/work/train.ipynb"> (train.ipynb)</span>');
  });

  it('plots the history, and shows no plot for a server without one', () => {
    const html = renderToStaticMarkup(
      React.createElement(SlotView, { slot: slot(), serverTime: 1006 })
    );
    expect(html).toContain('class="jp-RemoteGpu-spark"');
    expect(html).toContain('data-points="3"');
    expect(html).toContain('utilization peaked at 90%, memory at 2.0 GiB of 8.0 GiB');
    const old = renderToStaticMarkup(
      React.createElement(SlotView, { slot: slot({ history: undefined }), serverTime: 1006 })
    );
    expect(old).not.toContain('jp-RemoteGpu-spark');
  });

  it('names the Python environment of its session, and none for a server without environments', () => {
    const html = renderToStaticMarkup(
      React.createElement(SlotView, { slot: slot({ env: 'np1' }), serverTime: 1006 })
    );
    expect(html).toContain('cpu0 · pool default · env np1');
    const old = renderToStaticMarkup(
      React.createElement(SlotView, { slot: slot(), serverTime: 1006 })
    );
    expect(old).not.toContain('env ');
  });
});

describe('Sparkline', () => {
  it('says it is gathering readings until it has two', () => {
    const history: IHistory = { window: 300, time: [1000], utilization: [5], memory_used: [1] };
    const html = renderToStaticMarkup(
      React.createElement(Sparkline, { history, readings: null, now: 1000 })
    );
    expect(html).toContain('gathering readings');
    expect(html).toContain('data-points="1"');
  });

  it('spans what a young history has, at least MIN_SPAN, and at most the window', () => {
    const render = (time: number[], now: number): string =>
      renderToStaticMarkup(
        React.createElement(Sparkline, {
          history: { window: 300, time, utilization: time.map(() => 50), memory_used: time.map(() => null) },
          readings: null,
          now
        })
      );
    expect(MIN_SPAN).toBe(30);
    expect(render([1000, 1003, 1006], 1006)).toContain('last 30 s');
    expect(render([1000, 1003, 1006], 1006)).toContain('d="M160 18 L180 18 L200 18"');
    expect(render([1000, 1060, 1120], 1120)).toContain('last 2 min');
    expect(render([0, 1000, 1500], 1500)).toContain('last 5 min');
    expect(render([], 1500)).toContain('last 5 min');
  });

  it('scales a CPU slot that used several cores to its peak', () => {
    const history: IHistory = {
      window: 100,
      time: [900, 1000],
      utilization: [100, 200],
      memory_used: [null, null]
    };
    const html = renderToStaticMarkup(
      React.createElement(Sparkline, { history, readings: null, now: 1000 })
    );
    // 100 % is half way up when the peak is 200 %: y = 36 - 18.
    expect(html).toContain('d="M0 18 L200 0"');
    expect(html).toContain('class="jp-RemoteGpu-sparkMem" d=""');
  });
});
