import {
  Button,
  ReactWidget,
  UseSignal,
  refreshIcon
} from '@jupyterlab/ui-components';
import type { Message } from '@lumino/messaging';
import React from 'react';

import { slotsTitle } from './format';
import { gpuIcon } from './icons';
import { MiddleEllipsis } from './middle';
import { RemoteGpuModel, now, seconds } from './model';
import { SlotView } from './slots';
import type { IProblem } from './types';
import { JobView, LeaseView, ParkedView, QueueView } from './work';

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
          <Section
            title={slotsTitle(status.slots.map(slot => slot.kind))}
            count={status.slots.length}
          >
            {status.slots.length === 0 ? (
              <div className="jp-RemoteGpu-empty">This server offers no slots.</div>
            ) : (
              <ul className="jp-RemoteGpu-list">
                {status.slots.map(slot => (
                  <SlotView
                    key={slot.id}
                    slot={slot}
                    serverTime={status.server.time ?? now()}
                  />
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
          {model.parked.length > 0 && (
            <Section title="Parked" count={model.parked.length}>
              <div className="jp-RemoteGpu-empty">
                Saved on the server&apos;s disk, holding no GPU; the next cell restores
                its variables.
              </div>
              <ul className="jp-RemoteGpu-list">
                {model.parked.map(parked => (
                  <ParkedView
                    key={`${parked.id ?? parked.user}-${seconds(parked.since)}`}
                    model={model}
                    parked={parked}
                  />
                ))}
              </ul>
            </Section>
          )}
          <Section title="Your jobs" count={model.jobsTotal}>
            {model.jobs.length === 0 ? (
              <div className="jp-RemoteGpu-empty">No jobs yet.</div>
            ) : (
              <ul className="jp-RemoteGpu-list">
                {model.recentJobs.map(job => (
                  <JobView key={job.id} model={model} job={job} />
                ))}
              </ul>
            )}
            {model.jobsTotal > model.recentJobs.length && (
              <div className="jp-RemoteGpu-empty jp-RemoteGpu-more">
                The latest {model.recentJobs.length} of {model.jobsTotal};{' '}
                <code>rgpu jobs</code> lists more.
              </div>
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
      <div className="jp-RemoteGpu-server">
        <span
          className={`jp-RemoteGpu-dot jp-mod-${state.replace(' ', '-')}`}
          aria-hidden="true"
        />
        <span className="jp-RemoteGpu-state" data-state={state}>
          {state}
        </span>
        {you && model.status && (
          <span
            className="jp-RemoteGpu-you"
            title={`as ${you.user}${you.admin ? ' (admin)' : ''}, to remote-gpu server ${model.status.server.version}`}
          >
            as <b>{you.user}</b>
            {you.admin ? ' (admin)' : ''} · v{model.status.server.version}
          </span>
        )}
      </div>
      <div className="jp-RemoteGpu-urlRow">
        <MiddleEllipsis
          className="jp-RemoteGpu-url"
          text={model.url || 'no server URL'}
        />
      </div>
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
