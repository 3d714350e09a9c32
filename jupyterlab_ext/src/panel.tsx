import {
  Button,
  ReactWidget,
  UseSignal,
  refreshIcon
} from '@jupyterlab/ui-components';
import type { Message } from '@lumino/messaging';
import React from 'react';

import { formatBytes, formatDuration, formatPercent, fraction } from './format';
import { gpuIcon } from './icons';
import { CANCELLABLE, RemoteGpuModel, seconds } from './model';
import type {
  IJob,
  IProblem,
  IQueueEntry,
  IReadings,
  ISession,
  ISlot
} from './types';

/** The "Remote GPU" sidebar: a view of a `RemoteGpuModel`. */
export class RemoteGpuPanel extends ReactWidget {
  constructor(readonly model: RemoteGpuModel) {
    super();
    this.id = 'remote-gpu-sidebar';
    this.addClass('jp-RemoteGpu');
    this.title.icon = gpuIcon;
    this.title.caption = 'Remote GPU';
  }

  dispose(): void {
    this.model.dispose();
    super.dispose();
  }

  protected onAfterAttach(msg: Message): void {
    super.onAfterAttach(msg);
    this.model.visible = this.isVisible;
  }

  protected onAfterShow(msg: Message): void {
    super.onAfterShow(msg);
    this.model.visible = true;
  }

  protected onAfterHide(msg: Message): void {
    super.onAfterHide(msg);
    this.model.visible = false;
  }

  protected onBeforeDetach(msg: Message): void {
    this.model.visible = false;
    super.onBeforeDetach(msg);
  }

  render(): JSX.Element {
    return (
      <UseSignal signal={this.model.changed}>
        {() => (
          <RenderGuard key={this.model.updated ?? 0}>
            <RemoteGpuView model={this.model} />
          </RenderGuard>
        )}
      </UseSignal>
    );
  }
}

interface IGuardState {
  error: Error | null;
}

/**
 * Shows an answer the panel cannot draw as a message, not as an empty
 * sidebar; keyed by the refresh time, so the next answer tries again.
 */
class RenderGuard extends React.Component<
  { children: React.ReactNode },
  IGuardState
> {
  state: IGuardState = { error: null };

  static getDerivedStateFromError(error: Error): IGuardState {
    return { error };
  }

  render(): React.ReactNode {
    if (this.state.error === null) {
      return this.props.children;
    }
    return (
      <div className="jp-RemoteGpu-body">
        <div className="jp-RemoteGpu-problem" data-reason="render" role="alert">
          <div className="jp-RemoteGpu-problemMessage">
            The panel could not show the GPU server&rsquo;s answer (
            {this.state.error.message}).
          </div>
          <div className="jp-RemoteGpu-hint">
            The server and this JupyterLab extension may be of different
            versions: upgrade remote-gpu-kernel on both sides.
          </div>
        </div>
      </div>
    );
  }
}

function now(): number {
  return Date.now() / 1000;
}

function RemoteGpuView({ model }: { model: RemoteGpuModel }): JSX.Element {
  const status = model.status;
  const stale = model.problem !== null;
  return (
    <div className="jp-RemoteGpu-body">
      <Header model={model} />
      {model.problem && (
        <ProblemView problem={model.problem} onRetry={() => model.refresh()} />
      )}
      {model.actionError && (
        <div className="jp-RemoteGpu-notice jp-mod-error" role="alert">
          {model.actionError}
        </div>
      )}
      {status === null && model.problem === null && (
        <div className="jp-RemoteGpu-empty">Connecting…</div>
      )}
      {status !== null && (
        <div className={stale ? 'jp-RemoteGpu-content jp-mod-stale' : 'jp-RemoteGpu-content'}>
          <Section title="GPUs" count={status.slots.length}>
            {status.slots.length === 0 ? (
              <div className="jp-RemoteGpu-empty">This server offers no slots.</div>
            ) : (
              <ul className="jp-RemoteGpu-list">
                {status.slots.map(slot => (
                  <SlotView key={slot.id} slot={slot} />
                ))}
              </ul>
            )}
          </Section>
          <Section title="Your lease" count={model.myLeases.length}>
            {model.myLeases.length === 0 ? (
              <div className="jp-RemoteGpu-empty">
                You hold no GPU. A <code>%%gpu</code> cell or the Remote GPU
                kernel leases one.
              </div>
            ) : (
              <ul className="jp-RemoteGpu-list">
                {model.myLeases.map(session => (
                  <LeaseView key={session.id} model={model} session={session} />
                ))}
              </ul>
            )}
          </Section>
          <Section title="Queue" count={status.queue.length}>
            <QueueView queue={status.queue} />
          </Section>
          <Section title="Your jobs" count={model.jobs.length}>
            {model.jobs.length === 0 ? (
              <div className="jp-RemoteGpu-empty">No jobs yet.</div>
            ) : (
              <ul className="jp-RemoteGpu-list">
                {model.recentJobs.map(job => (
                  <JobView key={job.id} model={model} job={job} />
                ))}
              </ul>
            )}
          </Section>
        </div>
      )}
    </div>
  );
}

function Header({ model }: { model: RemoteGpuModel }): JSX.Element {
  const state = model.reachable
    ? 'connected'
    : model.problem === null
      ? 'connecting'
      : model.problem.reason === 'no-token'
        ? 'not configured'
        : 'unreachable';
  const you = model.status?.you;
  return (
    <header className="jp-RemoteGpu-header">
      <div className="jp-RemoteGpu-titleRow">
        <h2 className="jp-RemoteGpu-title">Remote GPU</h2>
        <Button
          minimal
          small
          title="Refresh now"
          aria-label="Refresh now"
          className="jp-RemoteGpu-refresh"
          onClick={() => void model.refresh()}
        >
          <refreshIcon.react tag="span" elementPosition="center" />
        </Button>
      </div>
      <div className="jp-RemoteGpu-server" title={model.url}>
        <span
          className={`jp-RemoteGpu-dot jp-mod-${state.replace(' ', '-')}`}
          aria-hidden="true"
        />
        <span className="jp-RemoteGpu-state" data-state={state}>
          {state}
        </span>
        <span className="jp-RemoteGpu-url">{model.url || 'no server URL'}</span>
      </div>
      {you && model.status && (
        <div className="jp-RemoteGpu-you">
          as <b>{you.user}</b>
          {you.admin ? ' (admin)' : ''} · server {model.status.server.version}
        </div>
      )}
      {model.status?.isolation?.isolated === false && (
        <div
          className="jp-RemoteGpu-notice jp-RemoteGpu-isolation jp-mod-warning"
          role="alert"
        >
          <b>Workers are not isolated.</b> {model.status.isolation.detail}
        </div>
      )}
    </header>
  );
}

function ProblemView({
  problem,
  onRetry
}: {
  problem: IProblem;
  onRetry: () => void;
}): JSX.Element {
  return (
    <div
      className={`jp-RemoteGpu-problem jp-mod-${problem.reason}`}
      data-reason={problem.reason}
      role="alert"
    >
      <div className="jp-RemoteGpu-problemMessage">{problem.message}</div>
      {problem.hint && (
        <div className="jp-RemoteGpu-hint">
          <WithCode text={problem.hint} />
        </div>
      )}
      <Button small onClick={onRetry}>
        Try again
      </Button>
    </div>
  );
}

/** `text` with its `backticked` parts shown as code (commands to run). */
function WithCode({ text }: { text: string }): JSX.Element {
  return (
    <>
      {text
        .split('`')
        .map((part, i) => (i % 2 ? <code key={i}>{part}</code> : part))}
    </>
  );
}

function Section({
  title,
  count,
  children
}: {
  title: string;
  count: number;
  children: React.ReactNode;
}): JSX.Element {
  return (
    <section className="jp-RemoteGpu-section" aria-label={title}>
      <h3 className="jp-RemoteGpu-sectionTitle">
        {title} <span className="jp-RemoteGpu-count">{count}</span>
      </h3>
      {children}
    </section>
  );
}

function Meter({
  label,
  value,
  text
}: {
  label: string;
  value: number | null;
  text: string;
}): JSX.Element {
  const level = value === null ? '' : value > 0.9 ? ' jp-mod-high' : '';
  return (
    <div className="jp-RemoteGpu-meter" title={`${label}: ${text}`}>
      <span className="jp-RemoteGpu-meterLabel">{label}</span>
      <span className="jp-RemoteGpu-meterTrack">
        <span
          className={`jp-RemoteGpu-meterFill${level}`}
          style={{ width: `${Math.round((value ?? 0) * 100)}%` }}
        />
      </span>
      <span className="jp-RemoteGpu-meterText">{text}</span>
    </div>
  );
}

function SlotView({ slot }: { slot: ISlot }): JSX.Element {
  const r = slot.readings;
  const holder = slot.holder;
  return (
    <li
      className={`jp-RemoteGpu-slot${holder?.mine ? ' jp-mod-mine' : ''}`}
      data-slot={slot.id}
    >
      <div className="jp-RemoteGpu-row">
        <span className="jp-RemoteGpu-name" title={slot.uuid || slot.id}>
          {slot.name}
        </span>
        <span
          className={`jp-RemoteGpu-badge ${slot.healthy ? 'jp-mod-ok' : 'jp-mod-bad'}`}
        >
          {slot.healthy ? 'healthy' : 'unhealthy'}
        </span>
      </div>
      <div className="jp-RemoteGpu-sub">
        {slot.id}
        {slot.pool ? ` · pool ${slot.pool}` : ''}
      </div>
      {slot.problem && <div className="jp-RemoteGpu-jobError">{slot.problem}</div>}
      {r === null ? (
        <div className="jp-RemoteGpu-sub">No NVML readings ({slot.kind} slot).</div>
      ) : (
        <>
          <Meter
            label="Util"
            value={fraction(r.utilization, 100)}
            text={formatPercent(r.utilization)}
          />
          <Meter
            label="Mem"
            value={fraction(r.memory_used, r.memory_total)}
            text={`${formatBytes(r.memory_used)} / ${formatBytes(r.memory_total)}`}
          />
          <div className="jp-RemoteGpu-sub">{sensors(r)}</div>
        </>
      )}
      <div className="jp-RemoteGpu-holder" data-holder={holder ? holder.user : ''}>
        {holder === null ? (
          <span className="jp-RemoteGpu-free">free</span>
        ) : (
          <>
            held by <b>{holder.mine ? 'you' : holder.user}</b> for{' '}
            {formatDuration(now() - seconds(holder.since))}
          </>
        )}
      </div>
    </li>
  );
}

/** Temperature, power and processes, leaving out what the slot does not report. */
function sensors(r: IReadings): string {
  const parts: string[] = [];
  if (r.temperature !== null) {
    parts.push(`${Math.round(r.temperature)} °C`);
  }
  if (r.power !== null) {
    parts.push(`${Math.round(r.power)} W`);
  }
  const n = r.processes.length;
  parts.push(n === 1 ? '1 process' : `${n} processes`);
  return parts.join(' · ');
}

function LeaseView({
  model,
  session
}: {
  model: RemoteGpuModel;
  session: ISession;
}): JSX.Element {
  const id = session.id ?? '';
  const pending = model.isPending(`session:${id}`);
  return (
    <li className="jp-RemoteGpu-lease" data-session={id}>
      <div className="jp-RemoteGpu-row">
        <span className="jp-RemoteGpu-name">{session.slots.join(', ')}</span>
        <Button
          small
          className="jp-RemoteGpu-release jp-mod-styled jp-mod-warn"
          disabled={pending}
          title="Release this lease: its kernel and variables on the GPU end"
          onClick={() => void model.release(id)}
        >
          {pending ? 'Releasing…' : 'Release'}
        </Button>
      </div>
      <div className="jp-RemoteGpu-sub">
        session {id.slice(0, 8)} · for {formatDuration(now() - seconds(session.since))}
        {' · '}idle {formatDuration(session.idle)}
      </div>
    </li>
  );
}

function QueueView({ queue }: { queue: IQueueEntry[] }): JSX.Element {
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

function JobView({ model, job }: { model: RemoteGpuModel; job: IJob }): JSX.Element {
  const pending = model.isPending(`job:${job.id}`);
  const when = job.ended ?? job.started ?? job.created;
  return (
    <li className="jp-RemoteGpu-job" data-job={job.id} data-state={job.state}>
      <div className="jp-RemoteGpu-row">
        <span className={`jp-RemoteGpu-badge jp-mod-${job.state}`}>
          {job.state.replace('_', ' ')}
        </span>
        <span className="jp-RemoteGpu-name">
          {job.name || `${job.kind} job ${job.id}`}
        </span>
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
      <div className="jp-RemoteGpu-sub">
        {job.slots.length > 0 ? `${job.slots.join(', ')} · ` : ''}
        {when === null ? '' : `${formatDuration(now() - seconds(when))} ago`}
      </div>
      {job.error && <div className="jp-RemoteGpu-jobError">{job.error}</div>}
    </li>
  );
}
