// The sidebar's model with a fake network: polling, standby, back-off,
// problems and the Release / Cancel actions.  Run with `npm test` in
// jupyterlab_ext/ (test_lab_model.py does that from pytest).

import { RemoteGpuError, problemFrom, problemOf } from '../../jupyterlab_ext/src/errors';
import {
  formatBytes,
  formatDuration,
  formatPercent,
  fraction
} from '../../jupyterlab_ext/src/format';
import { Signal } from '@lumino/signaling';

import { RECENT_JOBS, RemoteGpuModel } from '../../jupyterlab_ext/src/model';
import type {
  IJob,
  IJobList,
  IProblem,
  IRemoteGpuApi,
  IServerStatus,
  IStatusReply
} from '../../jupyterlab_ext/src/types';

const URL = 'ws://gpu-box:8765';

function status(overrides: Partial<IServerStatus> = {}): IServerStatus {
  return {
    server: { version: '0.1.0' },
    you: { user: 'alice', admin: false },
    slots: [
      {
        id: 'gpu0',
        kind: 'gpu',
        name: 'NVIDIA H100',
        uuid: 'GPU-1',
        healthy: true,
        pool: 'default',
        readings: {
          utilization: 40,
          memory_used: 2 * 1024 ** 3,
          memory_total: 80 * 1024 ** 3,
          temperature: 50,
          power: 120,
          processes: []
        },
        holder: { user: 'alice', since: 1000, mine: true, session: 's1' }
      }
    ],
    queue: [
      { position: 1, user: 'bob', gpus: 1, priority: 'normal', pool: 'default', waited: 5, mine: false },
      { position: 2, user: 'alice', gpus: 2, priority: 'normal', pool: 'default', waited: 3, mine: true }
    ],
    sessions: [
      { id: 's1', user: 'alice', slots: ['gpu0'], since: 1000, idle: 2, mine: true },
      { id: null, user: 'bob', slots: ['gpu1'], since: 1000, idle: 0, mine: false }
    ],
    usage: {},
    ...overrides
  };
}

function job(id: number, state: string, created: number): IJob {
  return { id, user: 'alice', kind: 'interactive', slots: ['gpu0'], state, error: null, created, started: null, ended: null };
}

class FakeApi implements IRemoteGpuApi {
  calls: string[] = [];
  failWith: IProblem | null = null;
  actionFailure: IProblem | null = null;
  reply: IServerStatus = status();
  jobList: IJob[] = [job(1, 'completed', 10), job(2, 'running', 20)];
  /** What the server says the user has; `undefined`: as many as listed. */
  jobTotal: number | null | undefined = undefined;

  /** While set, each status request waits for it (a slow server). */
  held: Promise<void> | null = null;

  async status(): Promise<IStatusReply> {
    this.calls.push('status');
    const reply = this.reply; // what the server knew when the request came
    if (this.held) {
      await this.held;
    }
    if (this.failWith) {
      throw new RemoteGpuError(this.failWith);
    }
    return { url: URL, status: reply };
  }

  async jobs(): Promise<IJobList> {
    this.calls.push('jobs');
    if (this.failWith) {
      throw new RemoteGpuError(this.failWith);
    }
    return { jobs: this.jobList, total: this.jobTotal === undefined ? this.jobList.length : this.jobTotal };
  }

  async cancelJob(id: number | string): Promise<void> {
    this.calls.push(`cancel ${id}`);
    if (this.actionFailure) {
      throw new RemoteGpuError(this.actionFailure);
    }
  }

  async releaseSession(id: string): Promise<void> {
    this.calls.push(`release ${id}`);
    if (this.actionFailure) {
      throw new RemoteGpuError(this.actionFailure);
    }
    this.reply = status({ sessions: [], slots: this.reply.slots.map(s => ({ ...s, holder: null })) });
  }

  async restartSession(id: string): Promise<void> {
    this.calls.push(`restart ${id}`);
    if (this.actionFailure) {
      throw new RemoteGpuError(this.actionFailure);
    }
    this.reply = status({
      sessions: this.reply.sessions.map(s => ({ ...s, busy: false, ignoring_interrupt: false }))
    });
  }

  count(name: string): number {
    return this.calls.filter(call => call === name).length;
  }
}

const UNREACHABLE: IProblem = {
  reason: 'unreachable',
  message: `The Remote GPU server at ${URL} is unreachable (connection refused).`,
  hint: 'Check that the GPU server is running (`rgpu serve`).',
  url: URL
};

function sleep(ms: number): Promise<void> {
  return new Promise(resolve => setTimeout(resolve, ms));
}

async function until(check: () => boolean, timeout = 3000): Promise<void> {
  const deadline = Date.now() + timeout;
  while (!check()) {
    if (Date.now() > deadline) {
      throw new Error('timed out waiting for a condition');
    }
    await sleep(5);
  }
}

let models: RemoteGpuModel[] = [];

function makeModel(
  api: IRemoteGpuApi,
  interval = 20,
  maxInterval = 2000,
  busy?: Signal<unknown, boolean>
): RemoteGpuModel {
  const model = new RemoteGpuModel({ api, interval, maxInterval, busy, busyInterval: 20 });
  models.push(model);
  return model;
}

afterEach(() => {
  models.forEach(model => model.dispose());
  models = [];
});

describe('RemoteGpuModel', () => {
  it('reads the status and the jobs, and says so through `changed`', async () => {
    const api = new FakeApi();
    const model = makeModel(api);
    let emitted = 0;
    model.changed.connect(() => (emitted += 1));
    expect(model.reachable).toBe(false);
    model.visible = true;
    await until(() => model.status !== null);
    expect(model.reachable).toBe(true);
    expect(model.url).toBe(URL);
    expect(model.slots.map(s => s.id)).toEqual(['gpu0']);
    expect(model.jobs).toHaveLength(2);
    expect(model.problem).toBeNull();
    expect(model.updated).not.toBeNull();
    expect(emitted).toBeGreaterThan(0);
  });

  it('polls every interval while visible and stands by while hidden', async () => {
    const api = new FakeApi();
    const model = makeModel(api, 20);
    await sleep(120);
    expect(api.count('status')).toBe(0);

    model.visible = true;
    await until(() => api.count('status') >= 3);

    model.visible = false;
    await sleep(40);
    const settled = api.count('status');
    await sleep(150);
    expect(api.count('status')).toBe(settled);
    expect(model.poll.state.phase).toBe('standby');

    model.visible = true;
    await until(() => api.count('status') > settled);
  });

  it('keeps the last state, shows the problem and backs off while failing', async () => {
    const api = new FakeApi();
    const model = makeModel(api, 20, 5000);
    model.visible = true;
    await until(() => model.reachable);

    api.failWith = UNREACHABLE;
    await until(() => model.problem !== null);
    expect(model.problem?.reason).toBe('unreachable');
    expect(model.reachable).toBe(false);
    expect(model.status).not.toBeNull();
    expect(model.url).toBe(URL);

    await until(() => model.poll.state.phase === 'rejected' && model.poll.state.interval > 100);
    const calls = api.count('status');
    await sleep(80);
    expect(api.count('status')).toBe(calls);

    api.failWith = null;
    await model.refresh();
    expect(model.problem).toBeNull();
    expect(model.reachable).toBe(true);
    await until(() => model.poll.state.interval === 20);
  });

  it('shows a missing token as a problem with a hint, not as an empty panel', async () => {
    const api = new FakeApi();
    api.failWith = {
      reason: 'no-token',
      message: 'No token is configured for the Remote GPU server.',
      hint: 'run `rgpu login URL TOKEN`',
      url: URL
    };
    const model = makeModel(api);
    model.visible = true;
    await until(() => model.problem !== null);
    expect(model.problem?.reason).toBe('no-token');
    expect(model.problem?.hint).toContain('rgpu login');
    expect(model.status).toBeNull();
    expect(model.url).toBe(URL);
  });

  it('picks out the user\u2019s own lease, queue entries and recent jobs', async () => {
    const api = new FakeApi();
    api.jobList = Array.from({ length: RECENT_JOBS + 3 }, (_, i) => job(i, i % 2 ? 'queued' : 'failed', i));
    const model = makeModel(api);
    model.visible = true;
    await model.refresh();
    expect(model.myLeases.map(s => s.id)).toEqual(['s1']);
    expect(model.myQueue.map(q => q.position)).toEqual([2]);
    const recent = model.recentJobs;
    expect(recent).toHaveLength(RECENT_JOBS);
    expect(recent[0].id).toBe(RECENT_JOBS + 2);
    expect(recent.map(j => Number(j.created))).toEqual([...recent.map(j => Number(j.created))].sort((a, b) => b - a));
  });

  it('counts all of the user\u2019s jobs, not only those it lists', async () => {
    const api = new FakeApi();
    api.jobTotal = 25;
    const model = makeModel(api);
    model.visible = true;
    await model.refresh();
    expect(model.jobs).toHaveLength(2);
    expect(model.jobsTotal).toBe(25);
    api.jobTotal = null; // a server from before the count
    await model.refresh();
    expect(model.jobsTotal).toBe(2);
  });

  it('asks at once when a kernel starts or stops running, and often while one runs', async () => {
    const api = new FakeApi();
    const busy = new Signal<unknown, boolean>({});
    const model = makeModel(api, 60000, 60000, busy);
    model.visible = true;
    await model.refresh();
    const before = api.count('status');
    await sleep(100);
    expect(api.count('status')).toBe(before); // a minute between polls while idle

    busy.emit(true); // a cell started: it may be leasing a GPU now
    await until(() => api.count('status') >= before + 3);
    expect(model.poll.frequency.interval).toBe(20);

    busy.emit(false); // it ended: its job is done
    await until(() => model.poll.frequency.interval === 60000);
    const settled = api.count('status');
    await sleep(100);
    expect(api.count('status')).toBeLessThanOrEqual(settled + 1);
  });

  it('asks once more when a kernel stops while the question asked as it started is on its way', async () => {
    const api = new FakeApi();
    const busy = new Signal<unknown, boolean>({});
    const model = makeModel(api, 60000, 60000, busy);
    model.visible = true;
    await model.refresh();
    let answer = () => {};
    api.held = new Promise(resolve => (answer = resolve));
    busy.emit(true); // a %%gpu cell starts: the question goes out before its lease exists
    await until(() => api.count('status') === 2);
    api.reply = status({ sessions: [{ id: 's9', user: 'alice', slots: ['gpu0'], since: 1000, idle: 0, mine: true }] });
    busy.emit(false); // the cell leased and ended while the server was slow to answer
    api.held = null;
    answer();
    await until(() => model.status?.sessions.some(s => s.id === 's9') ?? false);
    expect(model.poll.frequency.interval).toBe(60000); // not by a poll: a minute away
  });

  it('lists parked sessions, the user’s own first, and none from an older server', async () => {
    const api = new FakeApi();
    const model = makeModel(api);
    model.visible = true;
    await model.refresh();
    expect(model.parked).toEqual([]);
    api.reply = status({
      parked: [
        { id: null, user: 'bob', gpus: 1, pool: 'default', since: 900, nbytes: 10, mine: false },
        { id: 'p2', user: 'alice', gpus: 2, pool: 'default', since: 1200, nbytes: 20, mine: true },
        { id: 'p1', user: 'alice', gpus: 1, pool: 'default', since: 1100, nbytes: 30, mine: true }
      ]
    });
    await model.refresh();
    expect(model.parked.map(p => p.id ?? p.user)).toEqual(['p1', 'p2', 'bob']);
  });

  it('releases a lease and refreshes at once', async () => {
    const api = new FakeApi();
    const model = makeModel(api, 60000);
    model.visible = true;
    await model.refresh();
    const before = api.count('status');
    const pending = model.release('s1');
    expect(model.isPending('session:s1')).toBe(true);
    await pending;
    expect(model.isPending('session:s1')).toBe(false);
    expect(api.calls).toContain('release s1');
    expect(api.count('status')).toBe(before + 1);
    expect(model.myLeases).toEqual([]);
    expect(model.slots[0].holder).toBeNull();
    expect(model.actionError).toBeNull();
  });

  it('restarts the worker of a lease whose cell ignores interrupts', async () => {
    const api = new FakeApi();
    api.reply = status({
      sessions: api.reply.sessions.map(s => ({ ...s, busy: true, ignoring_interrupt: true }))
    });
    const model = makeModel(api, 60000);
    model.visible = true;
    await model.refresh();
    expect(model.myLeases[0].ignoring_interrupt).toBe(true);
    const pending = model.restart('s1');
    expect(model.isPending('restart:s1')).toBe(true);
    expect(model.isPending('session:s1')).toBe(false);
    await pending;
    expect(api.calls).toContain('restart s1');
    expect(model.myLeases[0].ignoring_interrupt).toBe(false);
    expect(model.actionError).toBeNull();
  });

  it('cancels a job, and reports a failed press with its reason', async () => {
    const api = new FakeApi();
    const model = makeModel(api, 60000);
    model.visible = true;
    await model.refresh();
    await model.cancel(2);
    expect(api.calls).toContain('cancel 2');
    expect(model.actionError).toBeNull();

    api.actionFailure = { reason: 'conflict', message: 'job 2 already ended (completed)', hint: '', url: URL };
    await model.cancel(2);
    expect(model.actionError).toBe('job 2 already ended (completed)');
  });

  it('does not call the server on a refresh while hidden', async () => {
    const api = new FakeApi();
    const model = makeModel(api, 60000);
    await model.refresh();
    expect(api.calls).toEqual([]);
    expect(model.poll.state.phase).toBe('standby');
  });

  it('stops polling when disposed', async () => {
    const api = new FakeApi();
    const model = makeModel(api, 10);
    model.visible = true;
    await until(() => api.count('status') >= 1);
    model.dispose();
    expect(model.isDisposed).toBe(true);
    const calls = api.count('status');
    await sleep(60);
    expect(api.count('status')).toBe(calls);
  });
});

describe('problems', () => {
  it('reads the server extension\u2019s error answers', () => {
    const problem = problemFrom(502, { reason: 'unauthorized', message: 'refused', hint: 'login', url: URL });
    expect(problem).toEqual({ reason: 'unauthorized', message: 'refused', hint: 'login', url: URL });
  });

  it('says how to enable the server extension when its handlers are missing', () => {
    const problem = problemFrom(404, { message: 'Not Found' });
    expect(problem.reason).toBe('jupyter');
    expect(problem.hint).toContain('jupyter server extension enable remote_gpu_lab');
  });

  it('turns any error into something to show', () => {
    expect(problemOf(new Error('boom')).message).toBe('boom');
    expect(problemOf(new RemoteGpuError(UNREACHABLE))).toBe(UNREACHABLE);
  });
});

describe('format', () => {
  it('formats bytes, durations and percentages', () => {
    expect(formatBytes(2 * 1024 ** 3)).toBe('2.0 GiB');
    expect(formatBytes(512)).toBe('512 B');
    expect(formatBytes(null)).toBe('–');
    expect(formatDuration(42)).toBe('42 s');
    expect(formatDuration(300)).toBe('5 min');
    expect(formatDuration(7500)).toBe('2 h 5 min');
    expect(formatDuration(90000)).toBe('1 d 1 h');
    expect(formatPercent(37.4)).toBe('37%');
    expect(fraction(150, 100)).toBe(1);
    expect(fraction(1, 0)).toBeNull();
    expect(fraction(null, 10)).toBeNull();
  });
});
