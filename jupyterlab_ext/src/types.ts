/**
 * The JSON the sidebar reads: the GPU server's `GET /api/status` and
 * `GET /api/jobs`, as relayed by the `/remote-gpu/` server extension.
 */

/** Seconds since the epoch, or an ISO 8601 string. */
export type Timestamp = number | string;

/**
 * The latest readings of one slot (NVML for a GPU, psutil for a CPU slot);
 * a field the slot cannot report is `null`.
 */
export interface IReadings {
  utilization: number | null;
  memory_used: number | null;
  /** What the slot's worker may use: the GPU's memory, or a CPU slot's share of the host's. */
  memory_total: number | null;
  temperature: number | null;
  power: number | null;
  /** `pid` is `null` unless the token is an admin's. */
  processes: { pid: number | null; memory: number | null }[];
  /** A CPU slot's host RAM, which its slots share; `null` or absent on a GPU. */
  host_memory_total?: number | null;
}

/** A slot's readings of the last minutes, as parallel lists, oldest first. */
export interface IHistory {
  /** The span the server keeps, in seconds. */
  window: number;
  /** Seconds since the epoch. */
  time: number[];
  utilization: (number | null)[];
  memory_used: (number | null)[];
}

export interface IHolder {
  user: string;
  since: Timestamp;
  mine: boolean;
  /** `interactive` (a notebook session) or `batch` (a submitted script). */
  kind?: string;
  /** Present only when `mine` (or for an admin). */
  session?: string | null;
  /** The notebook the lease is for; present only when `mine` (or for an admin). */
  notebook?: string | null;
}

/**
 * A slot held out because processes of a stopped worker still hold it
 * (GPU memory on a GPU); it is leased again once they let go.
 */
export interface IDraining {
  /** Since when, seconds since the epoch. */
  since: Timestamp;
  /** Empty, and each process's `pid` `null`, unless the token is an admin's. */
  pids: number[];
  processes: { pid: number | null; memory: number | null }[];
}

export interface ISlot {
  id: string;
  kind: string;
  name: string;
  uuid: string;
  healthy: boolean;
  /** Why the slot is unhealthy, when it is. */
  problem?: string | null;
  /** Set while the slot is draining; absent from servers older than draining. */
  draining?: IDraining | null;
  pool: string | null;
  /**
   * The Python environment of the session that holds it, else of its warm
   * worker; absent from servers older than named environments.
   */
  env?: string | null;
  readings: IReadings | null;
  /** Absent from servers older than the plots. */
  history?: IHistory | null;
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
  /** The batch job a batch lease runs (`mine` or admin only). */
  job?: number | null;
  /** Whether a cell (or a batch job) runs now. */
  busy?: boolean;
  /** The notebook's path on the user's machine; `null` for a script (`mine` or admin only). */
  notebook?: string | null;
  /** The first non-empty line of the latest cell's code (`mine` or admin only). */
  first_line?: string | null;
  /**
   * The running cell still ran seconds after an interrupt: it ignores
   * interrupts, and a restart of the worker stops it (`mine` or admin only).
   */
  ignoring_interrupt?: boolean | null;
  /** The Python environment its worker runs; absent from servers older than named environments. */
  env?: string | null;
}

/**
 * A parked session: its variables are saved on disk on the GPU server and it
 * holds no GPU; its next cell waits for one and restores them.
 */
export interface IParked {
  /** The session id: `null` unless `mine` (or for an admin). */
  id?: string | null;
  user: string;
  /** The GPUs its restore asks for, from `pool`. */
  gpus: number;
  pool: string | null;
  /** When it was parked. */
  since: Timestamp;
  /** Why it was parked (`mine` or admin only). */
  reason?: string | null;
  /** Bytes its saved variables take on the server's disk. */
  nbytes: number;
  /** When the server releases it if it is not restored first; `null`: never. */
  expires?: Timestamp | null;
  /** Its restore is under way. */
  resuming?: boolean;
  /** The names saved, and those that could not be (name → why): `mine` or admin only. */
  names?: string[] | null;
  unsaved?: { [name: string]: string } | null;
  notebook?: string | null;
  first_line?: string | null;
  mine: boolean;
}

/** How the server isolates its users' workers from each other. */
export interface IIsolation {
  /** False: every user's code can read the others' work on this server. */
  isolated: boolean;
  /** `uids`, `bubblewrap` or `none`. */
  mode: string;
  run_as?: string | null;
  /** The host memory limit of workers, in words (and what it does not count). */
  memory?: string;
  /** How many processes and threads a worker may run, in words. */
  processes?: string;
  /** One sentence that says how workers are (or are not) isolated. */
  detail: string;
}

export interface IServerStatus {
  /** `time`: the server's clock, seconds since the epoch. */
  server: { version: string; time?: number };
  you: { user: string; admin: boolean };
  slots: ISlot[];
  queue: IQueueEntry[];
  sessions: ISession[];
  /** Absent from servers older than parking. */
  parked?: IParked[];
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
  /** A batch job's name. */
  name?: string | null;
  /** The session the job ran in (a cell's lease, a batch attempt's). */
  session?: string | null;
  /** The notebook of the job's session; `null` for a script or a batch job. */
  notebook?: string | null;
  /** The first non-empty line of the job's code. */
  first_line?: string | null;
  slots: string[];
  state: JobState | string;
  error: string | null;
  created: Timestamp | null;
  started: Timestamp | null;
  ended: Timestamp | null;
}

/** What `GET /remote-gpu/jobs` answers: the latest jobs, and how many the user has. */
export interface IJobList {
  jobs: IJob[];
  /** `null` where the GPU server does not say (one older than the count). */
  total: number | null;
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
  jobs(): Promise<IJobList>;
  cancelJob(id: number | string): Promise<void>;
  releaseSession(id: string): Promise<void>;
  /** A fresh worker for the session now: its running cell is stopped, its variables lost. */
  restartSession(id: string): Promise<void>;
}
