/**
 * The JSON the sidebar reads: the GPU server's `GET /api/status` and
 * `GET /api/jobs`, as relayed by the `/remote-gpu/` server extension.
 */

/** Seconds since the epoch, or an ISO 8601 string. */
export type Timestamp = number | string;

/** NVML readings of one slot; `null` where the slot has none (a CPU slot). */
export interface IReadings {
  utilization: number | null;
  memory_used: number | null;
  memory_total: number | null;
  temperature: number | null;
  power: number | null;
  processes: { pid: number; memory: number | null }[];
}

export interface IHolder {
  user: string;
  since: Timestamp;
  mine: boolean;
  /** `interactive` (a notebook session) or `batch` (a submitted script). */
  kind?: string;
  /** Present only when `mine` (or for an admin). */
  session?: string | null;
}

export interface ISlot {
  id: string;
  kind: string;
  name: string;
  uuid: string;
  healthy: boolean;
  /** Why the slot is unhealthy, when it is. */
  problem?: string | null;
  pool: string | null;
  readings: IReadings | null;
  holder: IHolder | null;
}

export interface IQueueEntry {
  position: number | null;
  user: string;
  gpus: number;
  priority: number | string | null;
  pool: string | null;
  waited: number;
  mine: boolean;
  kind?: string;
}

export interface ISession {
  /** The session id: `null` (or absent) unless `mine` (or for an admin). */
  id?: string | null;
  /** `interactive` (a notebook session) or `batch` (a submitted script). */
  kind?: string;
  user: string;
  slots: string[];
  since: Timestamp;
  idle: number;
  mine: boolean;
}

/** How the server isolates its users' workers from each other. */
export interface IIsolation {
  /** False: every user's code can read the others' work on this server. */
  isolated: boolean;
  /** `uids`, `bubblewrap` or `none`. */
  mode: string;
  run_as?: string | null;
  /** The host memory limit of workers, in words. */
  memory?: string;
  /** One sentence that says how workers are (or are not) isolated. */
  detail: string;
}

export interface IServerStatus {
  server: { version: string; time?: number };
  you: { user: string; admin: boolean };
  slots: ISlot[];
  queue: IQueueEntry[];
  sessions: ISession[];
  usage: { [key: string]: unknown };
  /** Absent from servers older than isolation. */
  isolation?: IIsolation;
}

/** What `GET /remote-gpu/status` answers. */
export interface IStatusReply {
  url: string;
  status: IServerStatus;
}

export type JobState =
  | 'queued'
  | 'running'
  | 'completed'
  | 'failed'
  | 'cancelled'
  | 'timed_out';

export interface IJob {
  id: number | string;
  user: string;
  kind: string;
  name?: string | null;
  slots: string[];
  state: JobState | string;
  error: string | null;
  created: Timestamp | null;
  started: Timestamp | null;
  ended: Timestamp | null;
}

/** Why the sidebar could not get the state, as the server extension says it. */
export type ProblemReason =
  | 'bad-url'
  | 'no-token'
  | 'unreachable'
  | 'unauthorized'
  | 'not-found'
  | 'conflict'
  | 'server-error'
  | 'jupyter';

export interface IProblem {
  reason: ProblemReason;
  message: string;
  hint: string;
  /** The GPU server URL it tried, when known. */
  url: string;
}

/** The network the model talks to: `request.ts` in JupyterLab, a fake in tests. */
export interface IRemoteGpuApi {
  status(): Promise<IStatusReply>;
  jobs(): Promise<IJob[]>;
  cancelJob(id: number | string): Promise<void>;
  releaseSession(id: string): Promise<void>;
}
