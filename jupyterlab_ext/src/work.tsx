// The user's work in the sidebar: leases, the queue and jobs, each named by
// the notebook it came from and the first line of its code.

import { Button } from '@jupyterlab/ui-components';
import React from 'react';

import { confirmLoss } from './confirm';
import { baseName, formatBytes, formatDuration, splitName } from './format';
import { MiddleEllipsis } from './middle';
import { CANCELLABLE, RemoteGpuModel, now, seconds } from './model';
import type { IJob, IParked, IQueueEntry, ISession } from './types';

export function LeaseView({
  model,
  session
}: {
  model: RemoteGpuModel;
  session: ISession;
}): JSX.Element {
  const id = session.id ?? '';
  const pending = model.isPending(`session:${id}`);
  const restarting = model.isPending(`restart:${id}`);
  return (
    <li className="jp-RemoteGpu-lease" data-session={id}>
      <div className="jp-RemoteGpu-row">
        {session.busy && (
          <span className="jp-RemoteGpu-badge jp-mod-running">running</span>
        )}
        <Origin
          notebook={session.notebook}
          fallback={
            session.kind === 'batch'
              ? `batch job ${session.job ?? ''}`
              : `session ${id.slice(0, 8)}`
          }
        />
        <Button
          small
          className="jp-RemoteGpu-release jp-mod-styled jp-mod-warn"
          disabled={pending}
          title="Release this lease: its kernel and variables on the GPU end"
          onClick={() => void releaseLease(model, session)}
        >
          {pending ? 'Releasing…' : 'Release'}
        </Button>
      </div>
      <FirstLine line={session.first_line} />
      {session.ignoring_interrupt && (
        <div className="jp-RemoteGpu-row jp-RemoteGpu-stuck">
          <span className="jp-RemoteGpu-notice">
            This cell ignores interrupts.
          </span>
          <Button
            small
            className="jp-RemoteGpu-restart jp-mod-styled jp-mod-warn"
            disabled={restarting}
            title="Stop the cell by restarting its worker: SIGTERM, then SIGKILL to every process it started; the session's variables are lost"
            onClick={() => void restartWorker(model, session)}
          >
            {restarting ? 'Restarting…' : 'Restart worker'}
          </Button>
        </div>
      )}
      <Facts
        facts={[
          session.slots.join(', '),
          session.env ? `env ${session.env}` : '',
          `session ${id.slice(0, 8)}`,
          `for ${formatDuration(now() - seconds(session.since))}`,
          session.busy ? '' : `idle ${formatDuration(session.idle)}`
        ]}
      />
    </li>
  );
}

/**
 * A parked session: the user's own with its notebook, what was saved and a
 * Release button (which deletes the saved variables); another user's as who
 * and how much.
 */
export function ParkedView({
  model,
  parked
}: {
  model: RemoteGpuModel;
  parked: IParked;
}): JSX.Element {
  const id = parked.id ?? '';
  const pending = model.isPending(`session:${id}`);
  const unsaved = Object.keys(parked.unsaved ?? {});
  const expires =
    parked.expires === null || parked.expires === undefined
      ? ''
      : `kept ${formatDuration(seconds(parked.expires) - now())} more`;
  return (
    <li
      className={`jp-RemoteGpu-parked${parked.mine ? ' jp-mod-mine' : ''}`}
      data-session={id}
      title={parked.reason ? `Parked: ${parked.reason}` : undefined}
    >
      <div className="jp-RemoteGpu-row">
        <span className="jp-RemoteGpu-badge jp-mod-parked">
          {parked.resuming ? 'restoring' : 'parked'}
        </span>
        {parked.mine ? (
          <Origin notebook={parked.notebook} fallback={`session ${id.slice(0, 8)}`} />
        ) : (
          <span className="jp-RemoteGpu-name">{parked.user}</span>
        )}
        {parked.mine && id && (
          <Button
            small
            className="jp-RemoteGpu-release jp-mod-styled jp-mod-warn"
            disabled={pending}
            title="Release this parked session: its saved variables are deleted"
            onClick={() => void releaseParked(model, parked)}
          >
            {pending ? 'Releasing…' : 'Release'}
          </Button>
        )}
      </div>
      {parked.mine && <FirstLine line={parked.first_line} />}
      <Facts
        facts={[
          `${parked.gpus} slot${parked.gpus === 1 ? '' : 's'}${parked.pool ? ` of ${parked.pool}` : ''}`,
          `parked ${formatDuration(now() - seconds(parked.since))} ago`,
          `${formatBytes(parked.nbytes)} on disk`,
          parked.names ? `${parked.names.length} names` : '',
          expires
        ]}
      />
      {unsaved.length > 0 && (
        <div className="jp-RemoteGpu-sub jp-RemoteGpu-unsaved" title={unsaved.join(', ')}>
          Not saved: {unsaved.join(', ')}
        </div>
      )}
    </li>
  );
}

/** The name a dialog gives a lease or a parked session: its notebook's file name, or `fallback`. */
function whose(notebook: string | null | undefined, fallback: string): string {
  return notebook ? baseName(notebook) : fallback;
}

/** Release a lease once the user agreed that its variables go. */
async function releaseLease(model: RemoteGpuModel, session: ISession): Promise<void> {
  const id = session.id ?? '';
  const name = whose(session.notebook, `session ${id.slice(0, 8)}`);
  if (
    await confirmLoss(
      `Release the GPU of ${name}?`,
      'Its worker stops and the variables on the GPU are lost; a cell that runs now is stopped. ' +
        'The next cell leases a GPU again. (%gpu park keeps the variables instead.)',
      'Release'
    )
  ) {
    await model.release(id);
  }
}

/** Restart a stuck lease's worker once the user agreed that its variables go. */
async function restartWorker(model: RemoteGpuModel, session: ISession): Promise<void> {
  const id = session.id ?? '';
  const name = whose(session.notebook, `session ${id.slice(0, 8)}`);
  if (
    await confirmLoss(
      `Restart the worker of ${name}?`,
      'The running cell is stopped (SIGTERM, then SIGKILL to every process it started) and the ' +
        'variables on the GPU are lost; the GPU stays leased.',
      'Restart worker'
    )
  ) {
    await model.restart(id);
  }
}

/** Release a parked session once the user agreed that its saved variables go. */
async function releaseParked(model: RemoteGpuModel, parked: IParked): Promise<void> {
  const id = parked.id ?? '';
  const name = whose(parked.notebook, `session ${id.slice(0, 8)}`);
  if (
    await confirmLoss(
      `Delete the parked session of ${name}?`,
      `Its saved variables (${formatBytes(parked.nbytes)} on the server's disk) are deleted; the next ` +
        'cell leases a GPU and starts afresh.',
      'Release'
    )
  ) {
    await model.release(id);
  }
}

/**
 * Where a lease or a job came from: its notebook's file name (the path on
 * hover), cut in the middle where it does not fit, so that `Untitled12.ipynb`
 * and `Untitled13.ipynb` stay apart.
 */
function Origin({
  notebook,
  fallback
}: {
  notebook?: string | null;
  fallback: string;
}): JSX.Element {
  return notebook ? (
    <span className="jp-RemoteGpu-name jp-RemoteGpu-notebook" title={notebook}>
      <MiddleEllipsis
        className="jp-RemoteGpu-notebookName"
        text={baseName(notebook)}
        split={splitName}
      />
    </span>
  ) : (
    <span className="jp-RemoteGpu-name">{fallback}</span>
  );
}

/** A sub line of short facts joined by ` · `, each kept on one line; empty ones left out. */
function Facts({ facts }: { facts: string[] }): JSX.Element {
  const shown = facts.filter(fact => fact.length > 0);
  return (
    <div className="jp-RemoteGpu-sub">
      {shown.map((fact, i) => (
        <React.Fragment key={i}>
          {i > 0 && ' · '}
          <span className="jp-RemoteGpu-fact">{fact}</span>
        </React.Fragment>
      ))}
    </div>
  );
}

/** The first line of a lease's latest cell or of a job's code, as code. */
function FirstLine({ line }: { line?: string | null }): JSX.Element | null {
  if (!line) {
    return null;
  }
  return (
    <div className="jp-RemoteGpu-firstLine" title={line}>
      <code>{line}</code>
    </div>
  );
}

export function QueueView({ queue }: { queue: IQueueEntry[] }): JSX.Element {
  if (queue.length === 0) {
    return <div className="jp-RemoteGpu-empty">No one is waiting.</div>;
  }
  const mine = queue.filter(entry => entry.mine);
  return (
    <>
      {mine.length > 0 && (
        <div className="jp-RemoteGpu-notice">
          You are number{' '}
          {mine.map(entry => entry.position ?? '?').join(', ')} in the queue.
        </div>
      )}
      <ol className="jp-RemoteGpu-list jp-RemoteGpu-queue">
        {queue.map(entry => (
          <li
            key={`${entry.pool}-${entry.position}-${entry.user}`}
            className={`jp-RemoteGpu-queueEntry${entry.mine ? ' jp-mod-mine' : ''}`}
            data-position={entry.position ?? ''}
          >
            <span className="jp-RemoteGpu-position">#{entry.position ?? '?'}</span>
            <span className="jp-RemoteGpu-name">
              {entry.user}
              {entry.mine && <span className="jp-RemoteGpu-badge jp-mod-you">you</span>}
            </span>
            <span className="jp-RemoteGpu-sub">
              {entry.gpus} slot{entry.gpus === 1 ? '' : 's'}
              {entry.pool ? ` · ${entry.pool}` : ''} · waited{' '}
              {formatDuration(entry.waited)}
            </span>
          </li>
        ))}
      </ol>
    </>
  );
}

export function JobView({ model, job }: { model: RemoteGpuModel; job: IJob }): JSX.Element {
  const pending = model.isPending(`job:${job.id}`);
  const when = job.ended ?? job.started ?? job.created;
  return (
    <li className="jp-RemoteGpu-job" data-job={job.id} data-state={job.state}>
      <div className="jp-RemoteGpu-row">
        <span className={`jp-RemoteGpu-badge jp-mod-${job.state}`}>
          {job.state.replace('_', ' ')}
        </span>
        <Origin
          notebook={job.notebook}
          fallback={job.name || `${job.kind} job ${job.id}`}
        />
        {CANCELLABLE.has(job.state) && (
          <Button
            small
            minimal
            className="jp-RemoteGpu-cancel"
            disabled={pending}
            title="Cancel this job"
            onClick={() => void model.cancel(job.id)}
          >
            {pending ? 'Cancelling…' : 'Cancel'}
          </Button>
        )}
      </div>
      <FirstLine line={job.first_line} />
      <Facts
        facts={[
          job.slots.join(', '),
          when === null ? '' : `${formatDuration(now() - seconds(when))} ago`
        ]}
      />
      {job.error && <div className="jp-RemoteGpu-jobError">{job.error}</div>}
    </li>
  );
}
