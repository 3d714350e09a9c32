import type { IDisposable } from '@lumino/disposable';
import { Poll } from '@lumino/polling';
import { type ISignal, Signal } from '@lumino/signaling';

import { problemOf } from './errors';
import type {
  IJob,
  IJobList,
  IParked,
  IProblem,
  IQueueEntry,
  IRemoteGpuApi,
  IServerStatus,
  ISession,
  ISlot,
  Timestamp
} from './types';

/** Job states that can still be cancelled. */
export const CANCELLABLE: ReadonlySet<string> = new Set(['queued', 'running']);

/** How many of the user's jobs the sidebar lists. */
export const RECENT_JOBS = 8;

export namespace RemoteGpuModel {
  export interface IOptions {
    api: IRemoteGpuApi;
    /** Milliseconds between refreshes while all is well (default 3000). */
    interval?: number;
    /** The longest wait between tries while failing (default 30000). */
    maxInterval?: number;
    /**
     * Emits `true` when a kernel starts running and `false` once none runs
     * (JupyterLab's `ILabStatus.busySignal`).
     */
    busy?: ISignal<unknown, boolean>;
    /** Milliseconds between refreshes while a kernel runs (default 1000). */
    busyInterval?: number;
  }
}

/**
 * The sidebar's state: one `Poll` asks for the status and the user's jobs
 * every few seconds, backs off while that fails, and stands by while the
 * panel is hidden (set `visible`) or the browser tab is. It asks at once
 * when a kernel starts or stops running, and every second while one runs:
 * a cell's lease and its job show as they happen, not a poll later.
 */
export class RemoteGpuModel implements IDisposable {
  constructor(options: RemoteGpuModel.IOptions) {
    this._api = options.api;
    this._interval = options.interval ?? 3000;
    this._busyInterval = Math.min(options.busyInterval ?? 1000, this._interval);
    this._poll = new Poll<void, unknown>({
      factory: () => this._fetch(),
      frequency: {
        interval: this._interval,
        backoff: true,
        max: options.maxInterval ?? 30000
      },
      name: 'remote-gpu-lab:status',
      standby: () => !this._visible || 'when-hidden'
    });
    options.busy?.connect(this._onBusy, this);
  }

  /** Emits whenever anything the panel shows changes. */
  get changed(): ISignal<this, void> {
    return this._changed;
  }

  get poll(): Poll<void, unknown> {
    return this._poll;
  }

  /** The GPU server URL from the last answer (success or failure). */
  get url(): string {
    return this._url;
  }

  get status(): IServerStatus | null {
    return this._status;
  }

  get jobs(): IJob[] {
    return this._jobs;
  }

  /** How many jobs the user has: the server's count, else as many as it listed. */
  get jobsTotal(): number {
    return this._jobsTotal ?? this._jobs.length;
  }

  /** Why the last refresh failed; `null` after a success. */
  get problem(): IProblem | null {
    return this._problem;
  }

  /** Whether the last refresh reached the GPU server. */
  get reachable(): boolean {
    return this._status !== null && this._problem === null;
  }

  /** `Date.now()` of the last successful refresh. */
  get updated(): number | null {
    return this._updated;
  }

  /** What the last Release, Restart or Cancel press failed with, until the next press. */
  get actionError(): string | null {
    return this._actionError;
  }

  get isDisposed(): boolean {
    return this._poll.isDisposed;
  }

  /** Whether the panel is on screen: the poll stands by while it is not. */
  get visible(): boolean {
    return this._visible;
  }

  set visible(value: boolean) {
    if (value === this._visible) {
      return;
    }
    this._visible = value;
    if (value) {
      void this.refresh();
    }
  }

  get slots(): ISlot[] {
    return this._status?.slots ?? [];
  }

  get queue(): IQueueEntry[] {
    return this._status?.queue ?? [];
  }

  /** The user's own requests in the queue. */
  get myQueue(): IQueueEntry[] {
    return this.queue.filter(entry => entry.mine);
  }

  /** The user's own leases, each with the session id that releases it. */
  get myLeases(): ISession[] {
    return (this._status?.sessions ?? []).filter(
      session => session.mine && typeof session.id === 'string'
    );
  }

  /** Every parked session, the user's own first, then oldest first. */
  get parked(): IParked[] {
    return [...(this._status?.parked ?? [])].sort(
      (a, b) =>
        Number(b.mine) - Number(a.mine) || seconds(a.since) - seconds(b.since)
    );
  }

  /** The user's latest jobs, newest first. */
  get recentJobs(): IJob[] {
    return [...this._jobs]
      .sort((a, b) => seconds(b.created) - seconds(a.created))
      .slice(0, RECENT_JOBS);
  }

  /** Whether a press for `key` (`session:ID`, `restart:ID`, `job:ID`) is under way. */
  isPending(key: string): boolean {
    return this._pending.has(key);
  }

  /**
   * Ask now, out of turn (also resets the back-off). Asked while a question
   * is on its way, it asks once more when that is answered: the answer on
   * its way may be older than what made it ask (a cell that leased a GPU and
   * ended while a slow server answered the question asked as it started).
   */
  async refresh(): Promise<void> {
    if (this._asking) {
      this._again = true;
      await this._poll.tick;
      return;
    }
    await this._poll.refresh();
    await this._poll.tick;
  }

  /** Release one of the user's leases, then refresh. */
  release(sessionId: string): Promise<void> {
    return this._act(`session:${sessionId}`, () =>
      this._api.releaseSession(sessionId)
    );
  }

  /**
   * Restart the worker of one of the user's leases (its running cell is
   * stopped and its variables are lost), then refresh.
   */
  restart(sessionId: string): Promise<void> {
    return this._act(`restart:${sessionId}`, () =>
      this._api.restartSession(sessionId)
    );
  }

  /** Cancel one of the user's jobs, then refresh. */
  cancel(jobId: number | string): Promise<void> {
    return this._act(`job:${jobId}`, () => this._api.cancelJob(jobId));
  }

  dispose(): void {
    if (this.isDisposed) {
      return;
    }
    this._poll.dispose();
    Signal.clearData(this);
  }

  private async _act(key: string, call: () => Promise<void>): Promise<void> {
    if (this._pending.has(key)) {
      return;
    }
    this._pending.add(key);
    this._actionError = null;
    this._changed.emit();
    try {
      await call();
    } catch (error) {
      const problem = problemOf(error);
      this._actionError = problem.hint
        ? `${problem.message} ${problem.hint}`
        : problem.message;
    } finally {
      this._pending.delete(key);
      this._changed.emit();
    }
    if (!this.isDisposed) {
      await this.refresh();
    }
  }

  private _onBusy(_sender: unknown, busy: boolean): void {
    if (this.isDisposed) {
      return;
    }
    this._poll.frequency = {
      ...this._poll.frequency,
      interval: busy ? this._busyInterval : this._interval
    };
    void this.refresh();
  }

  private async _fetch(): Promise<void> {
    this._asking = true;
    this._again = false;
    try {
      const [reply, jobs] = await Promise.all([
        this._api.status(),
        this._api.jobs()
      ]);
      this._url = reply.url;
      this._status = reply.status;
      const list: Partial<IJobList> = jobs ?? {};
      this._jobs = Array.isArray(list.jobs) ? list.jobs : [];
      this._jobsTotal = typeof list.total === 'number' ? list.total : null;
      this._problem = null;
      this._updated = Date.now();
    } catch (error) {
      this._problem = problemOf(error);
      if (this._problem.url) {
        this._url = this._problem.url;
      }
      throw error;
    } finally {
      this._asking = false;
      if (!this.isDisposed) {
        this._changed.emit();
        if (this._again) {
          // Once the poll has taken this answer in: a refresh during the tick is dropped.
          setTimeout(() => void this.refresh(), 0);
        }
      }
    }
  }

  private _api: IRemoteGpuApi;
  private _poll: Poll<void, unknown>;
  private _changed = new Signal<this, void>(this);
  private _visible = false;
  private _url = '';
  private _status: IServerStatus | null = null;
  private _jobs: IJob[] = [];
  private _jobsTotal: number | null = null;
  private _interval: number;
  private _busyInterval: number;
  private _problem: IProblem | null = null;
  private _updated: number | null = null;
  private _actionError: string | null = null;
  private _pending = new Set<string>();
  /** A question is on its way; `_again`: ask once more when it is answered. */
  private _asking = false;
  private _again = false;
}

/** The browser's clock, in seconds since the epoch. */
export function now(): number {
  return Date.now() / 1000;
}

/** A timestamp as seconds since the epoch (`NaN` → 0, for sorting). */
export function seconds(value: Timestamp | null | undefined): number {
  if (value === null || value === undefined) {
    return 0;
  }
  const result =
    typeof value === 'number' ? value : Date.parse(value) / 1000;
  return Number.isFinite(result) ? result : 0;
}
